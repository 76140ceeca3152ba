"""The machine a benchmark ran on, printed at the top of every bench/*.py output and written into its result file.

A speed figure (and, through the CPU's kernels, the last digits of a metric) belongs to one CPU: the same run on
AMD EPYC with AVX-512 and on a Sapphire Rapids Xeon with AMX gives different numbers. So every benchmark names its
machine, and writes its numbers with that machine to ``bench/results/<date>-<script>[-<config>]-<cpu>.json``, the
files docs/performance.md is generated from (``bench/summary.py --write docs/performance.md``):

    from machine import machine_info, header_text, write_result   # bench/ is the script's folder, on sys.path
    machine = machine_info()
    print(header_text(machine))
    ...
    write_result("profile_step", "frozen", {"rows": rows}, machine, out=args.out)
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from petbreeds.atomic import atomic_write_json
from petbreeds.machine import CPUINFO, cpu_flags, cpu_model, usable_cores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# The benchmarks' default images: the real pets subset beside the project (shared/ on the machines this was measured
# on). Never replaced by other images when absent: a figure must say which data it came from.
SHARED_SUBSET = ROOT.parent / "shared" / "data" / "oxford-iiit-pet-subset"
# The instruction sets that change torch's CPU kernels: AVX2 / AVX-512 vectorisation, native bf16 (AVX512-BF16),
# and the AMX tile units that oneDNN uses for bf16 matrix products.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
# The keys of a result file's "machine"; a value may be null only in a file transcribed from a report.
MACHINE_FIELDS = ("cpu_model", "cores", "cores_online", "isa", "torch", "cpu_kernels", "date")
# A result file's "source" when the benchmark wrote it (a figure transcribed from a report says so instead).
WRITTEN = "written by the command"
# Words of a CPU model name that do not tell two CPUs apart (trademarks, "CPU", the clock).
_SLUG_NOISE = re.compile(r"\((r|tm)\)|\bcpu\b|\bprocessor\b|@.*$", re.IGNORECASE)


def isa_flags(cpuinfo: Path = CPUINFO) -> dict[str, bool] | None:
    """Which of :data:`ISA_FLAGS` the CPU has; None where ``/proc/cpuinfo`` does not say (not Linux)."""
    present = cpu_flags(cpuinfo)
    return None if present is None else {flag: flag in present for flag in ISA_FLAGS}


def machine_info(cpuinfo: Path = CPUINFO, now: datetime | None = None) -> dict[str, Any]:
    """The machine as data (:data:`MACHINE_FIELDS`): the CPU model, usable and online cores, ISA flags, torch's
    version and the CPU kernels it dispatches to (which ATEN_CPU_CAPABILITY can lower), and the UTC date."""
    now = now or datetime.now(UTC)
    return {
        "cpu_model": cpu_model(cpuinfo),
        "cores": usable_cores(),
        "cores_online": os.cpu_count(),
        "isa": isa_flags(cpuinfo),
        "torch": torch.__version__,
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "date": f"{now.astimezone(UTC):%Y-%m-%d %H:%M} UTC",
    }


def header_text(machine: dict[str, Any]) -> str:
    """The lines a benchmark prints first, from :func:`machine_info`'s record."""
    flags = machine["isa"]
    isa = (
        "unknown (no /proc/cpuinfo)"
        if flags is None
        else ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in flags.items())
    )
    return "\n".join(
        [
            f"# machine: {machine['cpu_model']}",
            f"# cores:   {machine['cores']} usable (of {machine['cores_online']} online)",
            f"# ISA:     {isa}",
            f"# torch:   {machine['torch']}, CPU kernels {machine['cpu_kernels']}",
            f"# date:    {machine['date']}",
        ]
    )


def machine_header(cpuinfo: Path = CPUINFO, now: datetime | None = None) -> str:
    """Lines naming the CPU model, usable cores, ISA flags, torch version and its kernels, and the UTC date."""
    return header_text(machine_info(cpuinfo, now))


def cpu_slug(model: str) -> str:
    """The CPU model as a file-name part: "AMD EPYC" → ``amd-epyc``, "Intel(R) Xeon(R) Platinum 8481C CPU @
    2.70GHz" → ``intel-xeon-platinum-8481c``: results are compared per CPU, so the name must say which."""
    words = re.sub(r"[^a-z0-9]+", "-", _SLUG_NOISE.sub(" ", model).lower()).strip("-")
    return words or "unknown-cpu"


def result_path(script: str, config: str | None, machine: dict[str, Any], folder: Path = RESULTS) -> Path:
    """``<folder>/<date>-<script>[-<config>]-<cpu>.json``: by configuration and hardware, as timm names its
    benchmark files, so that one file per (script, configuration, CPU) and day sorts by date."""
    parts = [machine["date"][:10], script, *([config] if config else []), cpu_slug(machine["cpu_model"])]
    return folder / ("-".join(parts) + ".json")


def require_images(data: Path) -> Path:
    """``data`` if it holds ``images/``; otherwise exit naming the folder and ``--data``: a benchmark that ran on
    other images than asked would quote numbers for data it did not say."""
    if not (data / "images").is_dir():
        raise SystemExit(
            f"error: {data}/images: no such folder; pass --data DIR, a folder holding images/ (the pets' layout, "
            "e.g. data/raw after `dvc repro fetch`)"
        )
    return data


def write_result(
    script: str, config: str | None, record: dict[str, Any], machine: dict[str, Any], out: Path | None = None
) -> Path:
    """Write ``record`` with the script, configuration, command line and machine to ``out`` or to
    :func:`result_path` (atomically: bench/summary.py never reads half a file); returns the path, also printed."""
    path = out or result_path(script, config, machine, RESULTS)
    command = shlex.join([f"bench/{script}.py", *sys.argv[1:]])
    header = {"script": script, "config": config, "command": command, "source": WRITTEN, "machine": machine}
    atomic_write_json(path, {**header, **record})
    print(f"result: {path}")
    return path


if __name__ == "__main__":
    print(machine_header())
