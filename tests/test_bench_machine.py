"""bench/machine.py: the header every benchmark prints names the CPU model, its ISA flags, torch and the date."""

from __future__ import annotations

import importlib.util
import platform
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# What /proc/cpuinfo says on the Sapphire Rapids machine, shortened to the fields and flags that matter.
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
"""


@pytest.fixture(scope="module")
def machine() -> ModuleType:
    """bench/machine.py, loaded from its path (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_machine", ROOT / "bench" / "machine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_header_names_the_cpu_its_flags_torch_and_the_date(machine: ModuleType, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(SAPPHIRE_RAPIDS)
    header = machine.machine_header(cpuinfo, now=datetime(2026, 11, 29, 9, 30, tzinfo=UTC))
    lines = header.splitlines()
    assert lines[0] == "# machine: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert "avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 yes, amx_tile yes" in header
    assert f"torch:   {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}" in header
    assert lines[-1] == "# date:    2026-11-29 09:30 UTC"
    assert "usable" in lines[1]

    cpuinfo.write_text("model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert "avx2 yes, avx512f yes, avx512_bf16 yes, amx_bf16 no, amx_tile no" in machine.machine_header(cpuinfo)


def test_without_proc_cpuinfo_the_platform_names_the_cpu(machine: ModuleType, tmp_path: Path) -> None:
    header = machine.machine_header(tmp_path / "absent")
    assert header.splitlines()[0] == f"# machine: {platform.processor() or 'unknown CPU'}"
    assert "ISA:     unknown (no /proc/cpuinfo)" in header


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="no /proc/cpuinfo (not Linux)")
def test_this_machine(machine: ModuleType) -> None:
    model = next(
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
    )
    header = machine.machine_header()
    assert header.startswith(f"# machine: {model}\n")
    assert all(f"{flag} yes" in header or f"{flag} no" in header for flag in machine.ISA_FLAGS)
