"""Device and precision choice, autocast, grad scaler (docs/fastai.md §8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petbreeds.errors import PetbreedsError
from petbreeds.learn.device import Compute, autocast, make_grad_scaler, pick_device, resolve_precision
from petbreeds.runtime import cache_dir, use_project_cache

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


def test_pick_device_prefers_cuda():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


# A "training step" that allocates, fills and frees 64 MiB blocks as activations do; prints the page faults of 10
# steps after 5 warm-up steps (which let the heap grow to its working size).
_FAULTS_SCRIPT = """
import resource, sys, torch
from petbreeds.learn.device import reuse_freed_cpu_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_cpu_memory()
def step():
    a = torch.empty(16 << 20).fill_(1.0)
    b = torch.empty(8 << 20).fill_(2.0)
    del a
    c = torch.empty(16 << 20).fill_(3.0)
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(run.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_cpu_memory_is_reused_instead_of_faulted_in_again():
    pages_per_step = (160 << 20) // 4096
    assert _page_faults("default") > 5 * pages_per_step  # glibc unmaps blocks > 32 MiB on free: faulted in anew
    assert _page_faults("reuse") < pages_per_step // 2  # the heap keeps its pages from step to step (0 usually)


# Grows the heap with 1 GiB of freed blocks, forks a child (as a DataLoader starting its workers does) and prints
# how much of the parent's memory the child shares copy-on-write (dirty pages), in MiB.
_SHARED_AFTER_FORK_SCRIPT = """
import os, sys, time, torch
from petbreeds.learn.device import reuse_freed_cpu_memory
assert reuse_freed_cpu_memory()
blocks = [torch.empty(64 << 20).fill_(1.0) for _ in range(4)]
del blocks
pid = os.fork()
if pid == 0:
    time.sleep(30)
    os._exit(0)
with open("/proc/self/smaps_rollup") as f:
    kib = sum(int(line.split()[1]) for line in f if line.startswith("Shared_Dirty:"))
os.kill(pid, 9)
print(kib // 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="Linux /proc")
def test_freed_cpu_memory_is_not_shared_copy_on_write_with_forked_workers():
    run = subprocess.run([sys.executable, "-c", _SHARED_AFTER_FORK_SCRIPT], capture_output=True, text=True, check=True)
    # ~290 MiB are torch's and Python's own; without the trim before the fork the freed 1 GiB is shared too (1.3 GiB)
    assert int(run.stdout.strip()) < 700


def test_resolve_precision_on_cpu():
    assert resolve_precision("fp32", CPU) is None
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    assert resolve_precision("auto", CPU) is None  # serving's; training calibrates (tests/test_calibration.py)
    with pytest.raises(PetbreedsError, match=r"train\.precision fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_the_precision_used_is_named_as_params_yaml_names_it(name):
    # what the stages record (StageContext.record), so that MLflow shows what train.precision auto became
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    assert Compute(CPU, dtype, channels_last=False).precision == name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resolve_precision_on_cuda():
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
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


def test_compiled_kernels_and_calibrations_are_cached_in_the_project(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # as DVC sets it for a stage, a queued experiment's included
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert cache_dir() == tmp_path.resolve() / ".cache"
    assert use_project_cache() == tmp_path.resolve() / ".cache" / "torchinductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path.resolve() / ".cache" / "torchinductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice wins
    assert use_project_cache() == tmp_path / "mine"
    ignored = {f: (ROOT / f).read_text().splitlines() for f in (".gitignore", ".dvcignore")}
    assert "/.cache/" in ignored[".gitignore"] and ".cache/" in ignored[".dvcignore"]


def _optimizer(device: torch.device) -> torch.optim.AdamW:
    from tiny import tiny_net

    from petbreeds.learn.model import param_groups
    from petbreeds.learn.schedule import make_optimizer

    model = tiny_net().to(device)
    return make_optimizer(param_groups(model), [1e-3] * 3, 0.01)


def test_adamw_is_the_reference_kernel_on_a_cpu():
    assert not _optimizer(CPU).defaults["fused"]  # bit-for-bit the results CPU runs always had


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_defaults_fused_adamw_cudnn_benchmark_or_deterministic_native_bf16():
    from petbreeds.learn.device import configure_gpu, native_bf16_on_gpu

    assert _optimizer(torch.device("cuda")).defaults["fused"] is True
    configure_gpu(deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    configure_gpu(deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled()
    configure_gpu(deterministic=False)
    major, _ = torch.cuda.get_device_capability()
    assert native_bf16_on_gpu() == (major >= 8)


def test_too_little_shared_memory_for_the_loaders_workers_is_an_error_naming_the_fix(tmp_path):
    from petbreeds.data.dataloaders import check_shared_memory

    check_shared_memory(workers=0, batch_bytes=10**18, shm=tmp_path)  # no workers: nothing in shared memory
    check_shared_memory(workers=16, batch_bytes=64 * 3 * 460 * 460, shm=tmp_path)  # the book's batch: 2.6 GB here
    with pytest.raises(PetbreedsError, match=r"holds \d+ MiB, but 2 loaders of 16 workers need about .* --shm-size="):
        check_shared_memory(workers=16, batch_bytes=10**15, shm=tmp_path)  # more than any disk
    with pytest.raises(PetbreedsError, match="data.num_workers lower"):
        check_shared_memory(workers=1, batch_bytes=10**15, shm=tmp_path)
