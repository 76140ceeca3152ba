"""What the training stages' resume state costs per saved epoch: seconds to write it, bytes on disk, seconds to read
it back, for each model and phase (frozen: only the head has optimizer state; unfrozen: every parameter).

    python bench/resume_cost.py [--arch efficientnet_lite0 resnet34] [--repeats 3] [--out FILE.json]

The state is the one ``fit_one_cycle`` saves (``petbreeds.learn.resume``), built from a real model, its AdamW
after one step (so that every trained parameter has both moments) and the one-cycle schedule, written by
``Resume.save`` into a temporary folder on the disk this runs on. Weights are random (the sizes are what count).
Writes the rows and the machine to bench/results/<date>-resume_cost-<cpu>.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import header_text, machine_info, write_result

from petbreeds.learn.model import create_model, freeze, param_groups, unfreeze
from petbreeds.learn.resume import Resume
from petbreeds.learn.schedule import make_one_cycle, make_optimizer
from petbreeds.world import SINGLE_PROCESS

ARCHES = ("efficientnet_lite0", "resnet34")


def measure(arch: str, phase: str, repeats: int, folder: Path) -> dict[str, float | str]:
    model = create_model(arch, 37, None)
    (freeze if phase == "frozen" else unfreeze)(model)
    opt = make_optimizer(param_groups(model), [1e-3] * len(param_groups(model)), 0.01)
    sched = make_one_cycle(opt, 100, 0.25, 25.0, 1e5)
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 1]))
    loss.backward()
    opt.step()
    state = {
        "epoch": 1,
        "iteration": 92,
        "history": [{"epoch": 0, "train_loss": 1.0}],
        "records": [{"iteration": i, "train_loss": 1.0, "lr": 1e-3} for i in range(92)],
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": sched.state_dict(),
        "scaler": {},
        "smooth": [1.0, 92],
        "shuffle_epoch": 1,
    }
    resume = Resume("train_" + phase, folder / f"{arch}-{phase}.pt", 1, SINGLE_PROCESS)
    generators = {"augment": torch.Generator(), "shuffle": torch.Generator()}
    save_s, load_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        resume.save(state, generators)
        save_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        resume.load(epochs=2)
        load_s.append(time.perf_counter() - started)
    assert resume.path is not None
    return {
        "arch": arch,
        "phase": phase,
        "mib": resume.path.stat().st_size / 2**20,
        "save_s": min(save_s),
        "load_s": min(load_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=list(ARCHES))
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many saves and loads is kept")
    parser.add_argument("--out", type=Path, help="write the result here, not to bench/results/ (JSON)")
    args = parser.parse_args()
    machine = machine_info()
    print(header_text(machine))
    print(f"{'arch':<20}{'phase':<10}{'MiB':>8}{'save s':>9}{'load s':>9}")
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:  # the disk the project (and its .cache/) is on
        for arch in args.arch:
            for phase in ("frozen", "unfrozen"):
                row = measure(arch, phase, args.repeats, Path(tmp))
                rows.append(row)
                print(f"{arch:<20}{phase:<10}{row['mib']:>8.1f}{row['save_s']:>9.3f}{row['load_s']:>9.3f}", flush=True)
    config = None if tuple(args.arch) == ARCHES else "-".join(args.arch)  # the file names other networks
    write_result("resume_cost", config, {"rows": rows}, machine, out=args.out)


if __name__ == "__main__":
    main()
