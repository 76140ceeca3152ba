"""Device and precision choice, autocast, grad scaler (spec §8)."""

from __future__ import annotations

import pytest
import torch

from petbreeds.device import CPU_AUTO_DTYPE, autocast, make_grad_scaler, pick_device, resolve_precision
from petbreeds.errors import PetbreedsError

CPU = torch.device("cpu")


def test_pick_device_prefers_cuda():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_resolve_precision_on_cpu():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("auto", CPU) is CPU_AUTO_DTYPE
    with pytest.raises(PetbreedsError, match=r"train\.precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_precision_on_cuda():
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_precision("auto", cuda) is expected
    assert make_grad_scaler(cuda, torch.float16).is_enabled()
    assert not make_grad_scaler(cuda, torch.bfloat16).is_enabled()


def test_autocast_runs_matmuls_in_the_chosen_dtype():
    layer = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    with autocast(CPU, torch.bfloat16):
        assert layer(x).dtype is torch.bfloat16
    with autocast(CPU, None):
        assert layer(x).dtype is torch.float32
    assert layer.weight.dtype is torch.float32  # weights stay fp32


def test_no_loss_scaling_on_cpu():
    assert not make_grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not make_grad_scaler(CPU, None).is_enabled()
