"""Which CPU this process runs on: its model name, flags and the cores it may use (read, not measured).

Light on purpose (no torch): the calibration keys its cache by it, the loaders size their workers by it, and every
bench/*.py names its machine with it (bench/machine.py).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    """The first ``name : value`` of ``/proc/cpuinfo`` (Linux); None when the file or the field is absent."""
    try:
        lines = cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform reports, else "unknown CPU"."""
    return cpuinfo_field("model name", cpuinfo) or platform.processor() or "unknown CPU"


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``); None where ``/proc/cpuinfo`` does not say."""
    flags = cpuinfo_field("flags", cpuinfo) or cpuinfo_field("Features", cpuinfo)
    return None if flags is None else set(flags.split())


def usable_cores() -> int:
    """Logical cores this process may run on (its affinity mask: what a container or taskset leaves it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
