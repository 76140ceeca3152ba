"""`train.precision: auto` on a CPU: the calibration that times fp32 against bf16, its per-CPU-model cache, and the
Compute the training stages and evaluate build from it. Real model, real timing, real cache files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import ROOT

from petbreeds.config import Params, load_params
from petbreeds.learn.calibration import (
    CACHE_FORMAT,
    MIN_SPEEDUP,
    cache_key,
    cpu_autocast_dtype,
    has_native_bf16,
)
from petbreeds.learn.training import training_compute
from petbreeds.machine import cpu_model
from petbreeds.world import SINGLE_PROCESS

CPU = torch.device("cpu")
# Small enough for a few seconds of timing on 2 cores (the stages time the real arch, size and batch).
ARCH, SIZE, BATCH = "efficientnet_lite0", 64, 4
NATIVE_BF16 = has_native_bf16()


def _params(precision: str = "auto") -> Params:
    params = load_params(ROOT / "params.yaml")
    data = params.data.model_copy(update={"size": SIZE, "batch_size": BATCH})
    model = params.model.model_copy(update={"arch": ARCH})
    train = params.train.model_copy(update={"precision": precision})
    return params.model_copy(update={"data": data, "model": model, "train": train})


def _write_entry(cache: Path, key: str, choice: str) -> None:
    entry = {"choice": choice, "fp32_s": 1.0, "bf16_s": 0.5 if choice == "bf16" else 2.0, "date": "2026-12-01"}
    cache.write_text(json.dumps({"format": CACHE_FORMAT, "entries": {key: entry}}))


def test_the_first_call_times_and_caches_both_precisions_the_second_reads_the_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cpu_precision.json"
    rng = torch.get_rng_state()
    first = cpu_autocast_dtype(ARCH, SIZE, BATCH, True, cache)
    if not NATIVE_BF16:  # bf16 would be emulated: fp32 without a timing, nothing to cache
        assert (first.dtype, first.fp32_s, first.bf16_s, first.from_cache) == (None, None, None, False)
        assert not cache.exists()
        return
    # a stage that calibrates trains exactly as one that reads the cache: the calibration draws from its own RNG
    assert torch.equal(torch.get_rng_state(), rng)
    assert not first.from_cache and first.fp32_s and first.bf16_s
    assert (first.dtype is torch.bfloat16) == (first.fp32_s >= MIN_SPEEDUP * first.bf16_s)
    entry = json.loads(cache.read_text())["entries"][cache_key(ARCH, SIZE, BATCH, True)]
    assert entry["choice"] == first.precision
    assert entry["fp32_s"] == round(first.fp32_s, 4) and entry["bf16_s"] == round(first.bf16_s, 4)
    written = cache.read_bytes()

    second = cpu_autocast_dtype(ARCH, SIZE, BATCH, True, cache)
    assert second.from_cache and second.dtype == first.dtype
    assert (second.fp32_s, second.bf16_s) == (entry["fp32_s"], entry["bf16_s"])
    assert cache.read_bytes() == written  # not timed again
    described = second.describe()
    assert described.startswith(f"calibrated on {cpu_model()}: fp32 ") and described.endswith("(cached)")


def test_a_cached_bf16_choice_for_this_machine_makes_auto_train_in_bf16(tmp_path: Path) -> None:
    # what a user of a CPU that calibrated bf16 (Sapphire Rapids with resnet34) sees in the stages' Compute
    cache = tmp_path / "cpu_precision.json"
    _write_entry(cache, cache_key(ARCH, SIZE, BATCH, True), "bf16")
    compute = training_compute(_params(), CPU, SINGLE_PROCESS, cache)
    if NATIVE_BF16:
        assert (compute.dtype, compute.precision) == (torch.bfloat16, "bf16")
        assert compute.precision_choice == f"calibrated on {cpu_model()}: fp32 1 s/step, bf16 0.5 s/step (cached)"
    else:  # the cache is not even read: bf16 is emulated here
        assert (compute.dtype, compute.precision_choice) == (None, f"fp32: {cpu_model()} has no native bf16")
    assert (compute.channels_last, compute.compile) == (True, _params().train.compile)


@pytest.mark.parametrize(("name", "dtype"), [("fp32", None), ("bf16", torch.bfloat16)])
def test_an_explicit_precision_never_calibrates(tmp_path: Path, name: str, dtype: torch.dtype | None) -> None:
    cache = tmp_path / "cpu_precision.json"
    _write_entry(cache, cache_key(ARCH, SIZE, BATCH, True), "fp32" if dtype else "bf16")  # says the opposite
    written = cache.read_bytes()
    compute = training_compute(_params(name), CPU, SINGLE_PROCESS, cache)
    assert (compute.dtype, compute.precision, compute.precision_choice) == (dtype, name, "set in params.yaml")
    assert cache.read_bytes() == written


def test_another_cpu_models_entry_is_ignored_and_kept(tmp_path: Path) -> None:
    cache = tmp_path / "cpu_precision.json"
    other = cache_key(ARCH, SIZE, BATCH, True, cpu="Some Other CPU 9000")
    _write_entry(cache, other, "bf16")
    calibration = cpu_autocast_dtype(ARCH, SIZE, BATCH, True, cache)
    assert not calibration.from_cache
    entries = json.loads(cache.read_text())["entries"]
    if NATIVE_BF16:  # timed here, and both machines' entries are in the file
        assert calibration.fp32_s and calibration.bf16_s
        assert set(entries) == {other, cache_key(ARCH, SIZE, BATCH, True)}
    else:
        assert calibration.dtype is None and set(entries) == {other}


# Rank 0 reads a cache that says bf16, rank 1 one that says fp32, as two machines of different CPU models could.
_RANKS_SCRIPT = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
from test_calibration import _params
from petbreeds.learn.distributed import join, leave
from petbreeds.learn.training import training_compute
params = _params()
world = join(params.distributed)
out = Path(sys.argv[2])
compute = training_compute(params, torch.device("cpu"), world, out / f"cache{world.rank}.json")
(out / f"rank{world.rank}.json").write_text(json.dumps([compute.precision, compute.precision_choice]))
leave()
"""


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BF16, reason="auto is fp32 untimed on a CPU without native bf16, on every rank")
def test_every_rank_uses_rank_0s_choice(tmp_path: Path) -> None:
    _write_entry(tmp_path / "cache0.json", cache_key(ARCH, SIZE, BATCH, True), "bf16")
    _write_entry(tmp_path / "cache1.json", cache_key(ARCH, SIZE, BATCH, True), "fp32")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, as DDP tests
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    done = subprocess.run(
        [*command, str(Path(__file__).parent), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and ranks[0][0] == "bf16"
