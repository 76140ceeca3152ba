"""The quick start's figures: the default pipeline (`dvc repro`, offline, the generated sample) run in a fresh clone of
this repository's HEAD, timed per stage, with the metrics and the model it ends with.

    .venv/bin/python bench/repro.py [--out FILE.json]

The clone runs with this environment's packages and its own ``src/`` (PYTHONPATH), so what is timed is the committed
code, as `make repro` runs it once installed. Writes bench/results/<date>-repro-<cpu>.json (``--out``: elsewhere).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import ROOT, header_text, machine_info, write_result

from petbreeds.track.provenance import git_commit

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def timed_repro(project: Path) -> tuple[list[dict[str, float | str]], float]:
    """Run ``dvc repro`` in ``project``: each stage's seconds (from its "Running stage" line to the next), the total."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project / "src"),
        "DVC_NO_ANALYTICS": "1",
    }
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(
        ["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = STAGE_LINE.match(line)
            if found:
                marks.append((found.group(1), time.perf_counter()))
                print(f"{marks[-1][1] - started:7.1f} s  {found.group(1)}", flush=True)
    total = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: dvc repro in {project} exited with {proc.returncode}")
    ends = [t for _, t in marks[1:]] + [started + total]
    return [{"stage": name, "seconds": round(end - t, 1)} for (name, t), end in zip(marks, ends, strict=True)], total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the result here, not to bench/results/ (JSON)")
    args = parser.parse_args(argv)
    machine = machine_info()
    print(header_text(machine))
    with tempfile.TemporaryDirectory(prefix="repro.") as tmp:
        project = Path(tmp) / "petbreeds"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        stages, total = timed_repro(project)
        metrics = json.loads((project / "metrics" / "evaluate.json").read_text(encoding="utf-8"))
        model_md5 = hashlib.md5((project / "models" / "model.pt").read_bytes()).hexdigest()
    record = {
        "commit": git_commit(ROOT),
        "total_s": round(total, 1),
        "stages": stages,
        "error_rate": metrics["error_rate"],
        "valid_loss": metrics["valid_loss"],
        "model_md5": model_md5,
    }
    print(f"dvc repro: {total:.0f} s, error_rate {metrics['error_rate']:.4f}, valid_loss {metrics['valid_loss']:.4f}")
    write_result("repro", None, record, machine, out=args.out)


if __name__ == "__main__":
    main()
