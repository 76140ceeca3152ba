"""The machine a benchmark ran on, printed at the top of every bench/*.py output.

A speed figure (and, through the CPU's kernels, the last digits of a metric) belongs to one CPU: the same run on
AMD EPYC with AVX-512 and on a Sapphire Rapids Xeon with AMX gives different numbers. So every benchmark names its
machine:

    from machine import machine_header   # bench/ is the script's folder, hence on sys.path
    print(machine_header())
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import torch

from petbreeds.machine import CPUINFO, cpu_flags, cpu_model, usable_cores

# The instruction sets that change torch's CPU kernels: AVX2 / AVX-512 vectorisation, native bf16 (AVX512-BF16),
# and the AMX tile units that oneDNN uses for bf16 matrix products.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def isa_flags(cpuinfo: Path = CPUINFO) -> dict[str, bool] | None:
    """Which of :data:`ISA_FLAGS` the CPU has; None where ``/proc/cpuinfo`` does not say (not Linux)."""
    present = cpu_flags(cpuinfo)
    return None if present is None else {flag: flag in present for flag in ISA_FLAGS}


def machine_header(cpuinfo: Path = CPUINFO, now: datetime | None = None) -> str:
    """Lines naming the CPU model, usable cores, ISA flags, torch version and its kernels, and the UTC date."""
    flags = isa_flags(cpuinfo)
    isa = (
        "unknown (no /proc/cpuinfo)"
        if flags is None
        else ", ".join(f"{flag} {'yes' if has else 'no'}" for flag, has in flags.items())
    )
    now = now or datetime.now(timezone.utc)
    return "\n".join(
        [
            f"# machine: {cpu_model(cpuinfo)}",
            f"# cores:   {usable_cores()} usable (of {os.cpu_count()} online)",
            f"# ISA:     {isa}",
            # The capability torch dispatches to, which ATEN_CPU_CAPABILITY can lower below what the CPU has.
            f"# torch:   {torch.__version__}, CPU kernels {torch.backends.cpu.get_cpu_capability()}",
            f"# date:    {now.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC",
        ]
    )


if __name__ == "__main__":
    print(machine_header())
