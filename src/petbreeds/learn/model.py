"""The learner's model: a pretrained body + fastai's head, its 3 parameter groups, freezing.

    model = create_model("resnet34", n_classes=37, pretrained_dir=Path("models/pretrained"))
    groups = param_groups(model)          # [ParamGroup(decay, no_decay)] * 3, as fastai's splitter
    freeze(model)                         # head + every norm layer train (fastai's train_bn=True)

Checkpoints of it: ``petbreeds.learn.checkpoint``.

Behaviour follows docs/fastai.md §3 (body cut, head layout and init, splitter, freeze).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from petbreeds.errors import PetbreedsError

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# Layers whose parameters fastai treats as "norm" params: trained while frozen (train_bn) and never weight-decayed.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
)


# --------------------------------------------------------------------------------------------------
# Body


class _ClampSavingResult(torch.autograd.Function):
    """``x.clamp_(0, 6)`` whose backward reads the result, so autograd keeps no copy of the input."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        x.clamp_(0.0, 6.0)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (result,) = ctx.saved_tensors  # type: ignore[attr-defined]
        # The gradient passes where 0 < input < 6, which is exactly where 0 < result < 6.
        return torch.ops.aten.hardtanh_backward(grad, result, 0.0, 6.0)


class ReLU6(nn.Module):
    """``nn.ReLU6(inplace=True)`` with the same outputs and gradients, bit for bit, and one pass less per layer.

    torch's in-place ReLU6 (``hardtanh_``) differentiates through its input, so autograd first copies every
    activation it clamps: for efficientnet_lite0 at batch 32, 224 px, 33 copies per step, up to 154 MB each,
    4-5 % of a CPU training step (AMD EPYC, 2026-11-30). This one differentiates through its result instead.
    """

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()  # always in place; the argument is the signature timm's act_layer is built with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ClampSavingResult.apply(x)


def create_imagenet_net(arch: str) -> nn.Module:
    """The randomly initialised 1000-class ImageNet network an ImageNet weights file fits (torchvision / timm)."""
    if arch in RESNETS:
        return getattr(torchvision.models, arch)(weights=None)
    if arch == "efficientnet_lite0":
        return timm.create_model("efficientnet_lite0", pretrained=False, act_layer=ReLU6)
    raise PetbreedsError(
        f"params.yaml: model.arch {arch!r} is not supported; use one of {(*RESNETS, 'efficientnet_lite0')}"
    )


def body_of(arch: str, net: nn.Module) -> nn.Sequential:
    """Cut an ImageNet network before its pooling and classifier (docs/fastai.md §3.1), sharing its modules.

    resnets: ``children[:-2]`` = conv1, bn1, relu, maxpool, layer1..layer4 (indices 0..7).
    efficientnet_lite0: conv_stem, bn1(+act), its 7 block stages, conv_head, bn2(+act) (indices 0..10), flat so
    that the parameter groups can cut it by index like the resnets.
    """
    if arch in RESNETS:
        return nn.Sequential(*list(net.children())[:-2])
    return nn.Sequential(net.conv_stem, net.bn1, *net.blocks, net.conv_head, net.bn2)


def _features_count(body: nn.Module) -> int:
    """Channels the body outputs, from a dummy forward in eval mode (so BN running stats stay untouched)."""
    was_training = body.training
    body.eval()
    with torch.no_grad():
        nf = body(torch.zeros(1, 3, 64, 64)).shape[1]
    body.train(was_training)
    return int(nf)


def _load_pretrained_body(body: nn.Module, arch: str, pretrained_dir: Path) -> None:
    """Load ``pretrained_dir/weights.pt`` (written by the weights stage) into ``body``; a "none" marker keeps it."""
    meta_path = pretrained_dir / "weights.json"
    if not meta_path.is_file():
        raise PetbreedsError(f"{meta_path}: not found; run `dvc repro weights` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("arch") != arch:
        raise PetbreedsError(
            f"{meta_path}: holds weights for {meta.get('arch')!r} but model.arch is {arch!r}; run `dvc repro weights`"
        )
    if meta.get("weights") == "none":
        return
    weights_path = pretrained_dir / "weights.pt"
    if not weights_path.is_file():
        raise PetbreedsError(f"{weights_path}: not found; run `dvc repro weights` again")
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    try:
        body.load_state_dict(state)
    except RuntimeError as e:
        raise PetbreedsError(f"{weights_path}: does not fit the {arch} body ({e}); run `dvc repro weights`") from None


# --------------------------------------------------------------------------------------------------
# Head (docs/fastai.md §3.2, §3.3)


class AdaptiveConcatPool2d(nn.Module):
    """fastai's concat pool: [B, C, H, W] -> [B, 2C, 1, 1], max-pooled channels first, then average-pooled."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([nn.functional.adaptive_max_pool2d(x, 1), nn.functional.adaptive_avg_pool2d(x, 1)], dim=1)


def create_head(nf: int, n_classes: int) -> nn.Sequential:
    """fastai's ``create_head(nf, n_classes)`` with its defaults: flat, indices 0..8, initialised as fastai does."""
    head = nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(2 * nf),
        nn.Dropout(0.25),
        nn.Linear(2 * nf, 512, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(512),
        nn.Dropout(0.5),
        nn.Linear(512, n_classes, bias=False),
    )
    for layer in head:
        if isinstance(layer, nn.BatchNorm1d):
            nn.init.ones_(layer.weight)
            nn.init.constant_(layer.bias, 1e-3)  # fastai's BatchNorm helper, not torch's 0
        elif isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
    return head


class PetModel(nn.Module):
    """``head(body(x))``: images [B, 3, H, W] float (normalised) -> logits [B, n_classes]."""

    def __init__(self, arch: str, body: nn.Sequential, head: nn.Sequential) -> None:
        super().__init__()
        self.arch = arch  # param_groups cuts the body where this architecture's splitter does
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def create_model(arch: str, n_classes: int, pretrained_dir: Path | None) -> PetModel:
    """Body of ``arch`` (pretrained from the weights stage's folder when given) + a fresh fastai head.

    The caller seeds torch first: the random init (head, and body without weights) draws from its RNG.
    """
    body = body_of(arch, create_imagenet_net(arch))
    if pretrained_dir is not None:
        _load_pretrained_body(body, arch, Path(pretrained_dir))
    return PetModel(arch, body, create_head(_features_count(body), n_classes))


# --------------------------------------------------------------------------------------------------
# Parameter groups and freezing (docs/fastai.md §3.4, §3.5, §4)


@dataclass
class ParamGroup:
    """One fastai parameter group, split by weight decay (fastai's wd_bn_bias=False)."""

    decay: list[nn.Parameter]
    no_decay: list[nn.Parameter]  # norm-layer params and every bias


# Where the body splits into groups 0 and 1. resnets: conv1, bn1, layer1, layer2 | layer3, layer4 (fastai's
# _resnet_split). efficientnet_lite0, cut at the same place (stride 8 -> 16): stem + stages 0-2 (16, 24, 40
# channels) | stages 3-6 (80, 112, 192, 320 channels) + conv_head.
BODY_CUT = {**dict.fromkeys(RESNETS, 6), "efficientnet_lite0": 5}


def _split(modules: list[nn.Module]) -> ParamGroup:
    group = ParamGroup(decay=[], no_decay=[])
    for top in modules:
        for module in top.modules():
            for name, param in module.named_parameters(recurse=False):
                no_decay = isinstance(module, NORM_TYPES) or name == "bias"
                (group.no_decay if no_decay else group.decay).append(param)
    return group


def param_groups(model: PetModel) -> list[ParamGroup]:
    """The 3 groups of docs/fastai.md §3.4 (early body | late body | head), each split into decay / no-decay params."""
    cut = BODY_CUT[model.arch]
    body = list(model.body)
    return [_split(body[:cut]), _split(body[cut:]), _split([model.head])]


def freeze(model: PetModel) -> None:
    """fastai's ``freeze()`` with train_bn=True: only the head and the body's norm-layer params train."""
    for module in model.body.modules():
        trainable = isinstance(module, NORM_TYPES)
        for param in module.parameters(recurse=False):
            param.requires_grad_(trainable)
    model.head.requires_grad_(True)


def unfreeze(model: PetModel) -> None:
    """fastai's ``unfreeze()``: every parameter trains."""
    model.requires_grad_(True)
