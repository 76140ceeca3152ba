"""Body + fastai head, its init, 3 parameter groups, freezing and checkpoints (docs/fastai.md §3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from petbreeds.config import DataParams, load_params
from petbreeds.data.imagenet import IMAGENET_MEAN
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint, save_checkpoint
from petbreeds.learn.model import (
    NORM_TYPES,
    AdaptiveConcatPool2d,
    ReLU6,
    create_model,
    freeze,
    param_groups,
    unfreeze,
)

DATA = DataParams(item_size=40, size=32, resize_method="crop", pad_mode="reflection", batch_size=4, num_workers=0)
AUGMENT = load_params(Path(__file__).resolve().parents[1] / "params.yaml").augment
VOCAB = ["a", "b", "c"]


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet18", 37, None)


def test_head_layout_is_fastais(resnet18):
    head = resnet18.head
    types = [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert [type(m) for m in head] == [*types, nn.Dropout, nn.Linear]
    assert (head[2].num_features, head[4].in_features, head[4].out_features) == (1024, 1024, 512)
    assert (head[6].num_features, head[8].in_features, head[8].out_features) == (512, 512, 37)
    assert (head[3].p, head[7].p) == (0.25, 0.5)
    assert head[4].bias is None and head[8].bias is None
    assert len(resnet18.body) == 8  # conv1, bn1, relu, maxpool, layer1..4


def test_head_init(resnet18):
    for bn in (resnet18.head[2], resnet18.head[6]):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 1e-3)
    w = resnet18.head[4].weight  # kaiming_normal_, fan_in: std sqrt(2 / 1024)
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    assert w.mean().item() == pytest.approx(0, abs=0.002)


def test_concat_pool_puts_max_before_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(1, 1, 2, 2)
    assert AdaptiveConcatPool2d()(x).flatten().tolist() == [6.0, 3.0]


def _saved_storages(act: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``act`` after a BN-like op (as in the body): output, input gradient, and the storages autograd saved."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.untyped_storage().data_ptr())
        return t

    leaf = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = act(leaf * 1.0)  # not a leaf, as a BN output
    y.backward(torch.arange(y.numel(), dtype=y.dtype).view_as(y))
    assert leaf.grad is not None
    return y.detach(), leaf.grad, saved


def test_relu6_is_torchs_bit_for_bit_without_copying_its_input():
    x = torch.randn(2, 3, 5, 5) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, 6.0, -0.0])  # the edges, where the gradient is 0 both ways
    ours, ours_grad, ours_saved = _saved_storages(ReLU6(), x)
    theirs, theirs_grad, theirs_saved = _saved_storages(nn.ReLU6(inplace=True), x)
    assert torch.equal(ours, theirs) and torch.equal(ours_grad, theirs_grad)
    assert ours_grad[0, 0, 0, :3].tolist() == [0.0, 0.0, 0.0]
    assert theirs_saved and theirs.untyped_storage().data_ptr() not in theirs_saved  # torch keeps a copy ...
    assert ours_saved == [ours.untyped_storage().data_ptr()]  # ... ours keeps only its output
    with torch.no_grad():
        assert torch.equal(ReLU6()(x.clone()), nn.functional.relu6(x))


def test_efficientnet_body_uses_the_copy_free_relu6():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 3, None)
    acts = [type(m) for m in model.body.modules() if "ReLU" in type(m).__name__]
    assert acts and set(acts) == {ReLU6}


def test_same_seed_same_model():
    torch.manual_seed(3)
    a = create_model("resnet18", 5, None)
    torch.manual_seed(3)
    b = create_model("resnet18", 5, None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0"])
def test_three_groups_hold_every_parameter_once(arch):
    torch.manual_seed(0)
    model = create_model(arch, 4, None)
    groups = param_groups(model)
    assert len(groups) == 3
    ids = [id(p) for g in groups for p in g.decay + g.no_decay]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    norm_or_bias = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    norm_or_bias |= {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    assert {id(p) for g in groups for p in g.no_decay} == norm_or_bias
    assert {id(p) for p in groups[2].decay + groups[2].no_decay} == {id(p) for p in model.head.parameters()}


def test_resnet_groups_follow_fastais_splitter(resnet18):
    groups = param_groups(resnet18)
    body = resnet18.body
    first = {id(p) for p in groups[0].decay + groups[0].no_decay}
    assert first == {id(p) for m in (body[0], body[1], body[4], body[5]) for p in m.parameters()}
    second = {id(p) for p in groups[1].decay + groups[1].no_decay}
    assert second == {id(p) for m in (body[6], body[7]) for p in m.parameters()}


def test_freeze_trains_the_head_and_only_norm_layers_of_the_body():
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 4, None)
    freeze(model)
    norm = {id(p) for m in model.body.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    assert norm
    assert {id(p) for p in model.body.parameters() if p.requires_grad} == norm
    assert all(p.requires_grad for p in model.head.parameters())
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, resnet18):
    torch.manual_seed(1)
    model = create_model("resnet18", len(VOCAB), None)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the BN running stats off their init
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, arch="resnet18", vocab=VOCAB, data=DATA, augment=AUGMENT)
    loaded, ckpt = load_checkpoint(path, torch.device("cpu"))
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))
    assert (ckpt.arch, ckpt.vocab, ckpt.item_size, ckpt.size) == ("resnet18", VOCAB, 40, 32)
    assert (ckpt.resize_method, ckpt.pad_mode, ckpt.mean) == ("crop", "reflection", list(IMAGENET_MEAN))
    assert ckpt.augment == AUGMENT and ckpt.train_augment(torch.device("cpu"), seed=0).aug == AUGMENT
    assert torch.load(path, weights_only=True)["format"] == "petbreeds-model/1"


def test_a_checkpoint_without_augment_predicts_but_not_with_tta(tmp_path):
    path = tmp_path / "model.pt"
    model = create_model("resnet18", len(VOCAB), None)
    save_checkpoint(path, model, arch="resnet18", vocab=VOCAB, data=DATA, augment=AUGMENT)
    state = torch.load(path, weights_only=True)
    del state["augment"]  # as saved before checkpoints recorded it
    torch.save(state, path)
    _, ckpt = load_checkpoint(path, torch.device("cpu"))
    assert ckpt.augment is None
    with pytest.raises(PetbreedsError, match="records no training augmentation.*dvc repro train_unfrozen"):
        ckpt.train_augment(torch.device("cpu"), seed=0)


def test_the_same_model_saved_twice_is_the_same_file(tmp_path, resnet18):
    """DVC addresses models/*.pt by md5: the same weights must give the same bytes, or every run of an unchanged
    pipeline stores, pushes and reports (MLflow's model.md5) a new model. torch.save names its zip records after
    the file it writes to, which atomic_output names at random."""
    first, second = tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt"
    for path in (first, second):
        save_checkpoint(path, resnet18, arch="resnet18", vocab=VOCAB, data=DATA, augment=AUGMENT)
    assert first.read_bytes() == second.read_bytes()


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(PetbreedsError, match=r"missing\.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt", torch.device("cpu"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(PetbreedsError, match=r"garbage\.pt: not a petbreeds checkpoint"):
        load_checkpoint(garbage, torch.device("cpu"))
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(PetbreedsError, match=r"plain\.pt: not a petbreeds checkpoint"):
        load_checkpoint(plain, torch.device("cpu"))
    old = tmp_path / "old.pt"
    torch.save({"format": "petbreeds-model/0"}, old)
    with pytest.raises(PetbreedsError, match=r"old\.pt: checkpoint format 'petbreeds-model/0'"):
        load_checkpoint(old, torch.device("cpu"))
    truncated = tmp_path / "truncated.pt"
    torch.save({"format": "petbreeds-model/1", "arch": "resnet18"}, truncated)
    with pytest.raises(PetbreedsError, match=r"truncated\.pt: damaged"):
        load_checkpoint(truncated, torch.device("cpu"))


def test_pretrained_folder_for_another_arch_is_refused(tmp_path):
    (tmp_path / "weights.json").write_text(json.dumps({"arch": "resnet34", "weights": "none"}))
    with pytest.raises(PetbreedsError, match=r"weights\.json: holds weights for 'resnet34'.*dvc repro weights"):
        create_model("resnet18", 3, tmp_path)
    with pytest.raises(PetbreedsError, match="run `dvc repro weights` first"):
        create_model("resnet18", 3, tmp_path / "absent")
