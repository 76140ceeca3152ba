"""The ImageNet statistics every pretrained body here was trained with: inputs are normalised by them."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
