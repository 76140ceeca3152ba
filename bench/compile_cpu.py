"""Does ``train.compile: true`` (torch.compile, inductor) pay on this CPU? Decides its default.

    .venv/bin/python bench/compile_cpu.py [--size 224] [--bs 32] [--steps 6] [--rounds 2]

For the frozen and the unfrozen model (efficientnet_lite0, fp32, channels_last, train mode, as the pipeline trains),
each in its own process: the eager step; the compiled step with an empty cache (cold: the first step compiles);
the compiled step again with that cache (warm: what every later stage and run on this machine pays). Times forward +
backward + AdamW on one random batch, median of ``--steps`` after the first; the modes alternate round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from machine import machine_header

MODES = ("eager", "compiled, cold cache", "compiled, warm cache")


def child(phase: str, compiled: bool, size: int, batch: int, steps: int) -> dict[str, float]:
    import torch

    from petbreeds.device import Compute, pick_device
    from petbreeds.model import create_model, freeze, param_groups, unfreeze
    from petbreeds.schedule import make_optimizer
    from petbreeds.training import train_step

    compute = Compute(pick_device(), None, channels_last=True, compile=compiled)
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 37, None)
    (freeze if phase == "frozen" else unfreeze)(model)
    compute.place(model)
    model.train()
    net = compute.for_training(model)
    opt = make_optimizer(param_groups(model), [1e-6] * 3, 0.01)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 37, (batch,))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        train_step(net, opt, compute.grad_scaler(), x, y, compute)
        times.append(time.perf_counter() - started)
    return {"first_s": times[0], "step_s": statistics.median(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("PHASE", "COMPILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        phase, compiled = args.child
        print(json.dumps(child(phase, compiled == "1", args.size, args.bs, args.steps)))
        return
    print(machine_header(), flush=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="inductor.") as cache:
            for phase in ("frozen", "unfrozen"):
                order = MODES if round_ % 2 == 0 else ("compiled, cold cache", "compiled, warm cache", "eager")
                for mode in order:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                    cmd = [sys.executable, __file__, "--child", phase, "0" if mode == "eager" else "1", "--size",
                           str(args.size), "--bs", str(args.bs), "--steps", str(args.steps)]  # fmt: skip
                    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                    results.setdefault((phase, mode), []).append(json.loads(out.strip().splitlines()[-1]))
                    print(f"round {round_ + 1}, {phase}, {mode}: {results[phase, mode][-1]}", flush=True)
    setup = f"efficientnet_lite0, {args.size} px, batch {args.bs}, fp32 channels_last"
    print(f"\n{setup}, median of {args.rounds} rounds\n")
    print("| phase | mode | first step s (compiles) | s / step | speed-up |\n|---|---|---|---|---|")
    for (phase, mode), runs in results.items():
        first = statistics.median(r["first_s"] for r in runs)
        step = statistics.median(r["step_s"] for r in runs)
        eager = statistics.median(r["step_s"] for r in results[phase, "eager"])
        print(f"| {phase} | {mode} | {first:.1f} | {step:.3f} | {eager / step:.2f}× |")


if __name__ == "__main__":
    main()
