"""bench/depthwise_cpu.py: the weight gradient it times against oneDNN's is the same gradient, and the layers it
times are efficientnet_lite0's depthwise convolutions at the right sizes."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def depthwise(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/depthwise_cpu.py as a module (bench/ is a folder of scripts: it imports bench/machine.py by name)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_depthwise_cpu", BENCH / "depthwise_cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("k", "stride"), [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_shifted_products_are_the_depthwise_weight_gradient(depthwise: ModuleType, k: int, stride: int) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, k, stride, k // 2, groups=8, bias=False)
    x = torch.randn(3, 8, 13, 13, requires_grad=True)
    out = conv(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert conv.weight.grad is not None
    ours = depthwise.shifted_products(x.detach(), grad_out, k, stride)
    torch.testing.assert_close(ours, conv.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(depthwise.onednn_grad(conv, x.detach(), grad_out, True), conv.weight.grad)


def test_the_timed_layers_are_efficientnet_lite0s_depthwise_convolutions(depthwise: ModuleType) -> None:
    convs = depthwise.depthwise_convs(224)
    kernels = [(c.in_channels, c.kernel_size[0], c.stride[0], tuple(c.input_hw)) for c in convs]
    assert len(kernels) == 16  # one per inverted-residual block, as timm builds the network
    assert kernels[0] == (32, 3, 1, (112, 112))
    assert kernels[1] == (96, 3, 2, (112, 112))
    assert kernels[-1] == (1152, 3, 1, (7, 7))
    assert sum(k == 5 for _, k, _, _ in kernels) == 9
