"""Who produced a stage's outputs: the ``reports/run_info/<stage>.json`` sidecar and the facts it records.

``run_stage`` writes the sidecar after a stage succeeds. It is a DVC output of every stage, so when DVC restores
the stage from its run cache the sidecar comes back with the outputs and still names the execution that made
them; ``petbreeds.track.identity`` reads it to tag executed vs restored stages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RUN_INFO_DIR = Path("reports/run_info")


def run_info_path(root: Path, stage: str) -> Path:
    return root / RUN_INFO_DIR / f"{stage}.json"


def git_commit(cwd: Path) -> str | None:
    """HEAD of the git repo at ``cwd`` (a queued experiment's temp checkout has one too), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def dvc_invocation() -> str | None:
    """``"<pid>:<start time>"`` of the ``dvc`` process that runs this one, or None outside DVC.

    DVC gives plain ``dvc repro`` no run id, yet ``mlflow_log`` must tell the stages this invocation
    executed from those it restored from the run cache; the parent ``dvc`` process identifies it (found
    through any launcher in between, e.g. torchrun's agent for a distributed stage).
    """
    import psutil  # a dependency of the project; imported here to keep stage start-up light

    try:
        proc = psutil.Process().parent()
        while proc is not None:
            argv = proc.cmdline()
            if any(Path(arg).name == "dvc" for arg in argv[:3]):
                return f"{proc.pid}:{proc.create_time():.3f}"
            proc = proc.parent()
    except psutil.Error:
        return None
    return None


def _device_used() -> str:
    # Stages that never import torch (fetch, index, split) ran on the CPU; importing it here would cost seconds.
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def run_info(
    name: str,
    root: Path,
    started: float,
    finished: float,
    live_run_id: str | None,
    world_size: int = 1,
    facts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The sidecar's content (the contract in docs/architecture.md, plus ``invocation``); ``facts``: how the stage
    ran, beyond params.yaml (``StageContext.record``: the precision used)."""
    return {
        "stage": name,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or None,
        "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or None,
        "started": _iso(started),
        "finished": _iso(finished),
        "duration_s": round(finished - started, 3),
        "host": socket.gethostname(),
        "device": _device_used(),
        "world_size": world_size,
        "git_commit": git_commit(root),
        "mlflow_child_run_id": live_run_id,
        "invocation": dvc_invocation(),
        "facts": dict(facts or {}),
    }
