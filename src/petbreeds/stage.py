"""What every ``stages/<name>.py`` shares: load params, run, report errors without a traceback, and leave a
record of who produced the outputs.

A stage script is three lines::

    from petbreeds.stage import run_stage

    def main(params, ctx): ...

    if __name__ == "__main__":
        run_stage("train_frozen", main)

After ``main`` succeeds, ``run_stage`` writes ``reports/run_info/<stage>.json`` (a DVC out of every stage).
When DVC later restores the stage from its run cache, that file is restored with the outputs, so it still
says truthfully which execution produced them; ``petbreeds.tracking`` reads it to tag executed vs restored
stages. The training stages also stream live metrics into an MLflow child run (see ``LIVE_STAGES``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params, load_params
from petbreeds.errors import PetbreedsError

RUN_INFO_DIR = Path("reports/run_info")
# Stages that open a live MLflow child run (per-epoch curves + system metrics while they train).
LIVE_STAGES = ("lr_find", "train_frozen", "train_unfrozen")
# Tracking switches are env vars, not params: a param change would invalidate the training stages.
LIVE_ENV = "PETBREEDS_MLFLOW_LIVE"


class MetricsSink(Protocol):
    """Where ``StageContext.log_metrics`` streams to (``petbreeds.tracking.LiveRun``)."""

    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def end(self, status: str) -> None: ...


@dataclass
class StageContext:
    """Handed to a stage's ``main``: its name, the folder it runs in, and a sink for live per-step metrics.

    ``log_metrics`` streams to the live tracking run when one is open (see petbreeds.tracking);
    it never fails the stage.
    """

    name: str
    root: Path
    live: MetricsSink | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Stream metrics while the stage runs (no-op without a live tracking run)."""
        if self.live is not None:
            self.live.log_metrics(metrics, step)


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
    executed from those it restored from the run cache; the parent ``dvc`` process identifies it.
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
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def run_info(name: str, root: Path, started: float, finished: float, live_run_id: str | None) -> dict[str, Any]:
    """The sidecar's content (the contract in docs/architecture.md, plus ``invocation``)."""
    return {
        "stage": name,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME") or None,
        "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or None,
        "started": _iso(started),
        "finished": _iso(finished),
        "duration_s": round(finished - started, 3),
        "host": socket.gethostname(),
        "device": _device_used(),
        "git_commit": git_commit(root),
        "mlflow_child_run_id": live_run_id,
        "invocation": dvc_invocation(),
    }


def _open_live_run(name: str, root: Path) -> MetricsSink | None:
    if name not in LIVE_STAGES or os.environ.get(LIVE_ENV, "1") == "0":
        return None
    from petbreeds.tracking import LiveRun  # imports mlflow (~3 s): only the training stages pay for it

    return LiveRun.start(name, root)


def run_stage(
    name: str,
    main: Callable[[Params, StageContext], None],
    params_path: str = "params.yaml",
    *,
    write_run_info: bool = True,
) -> None:
    """Run a stage's ``main``; a :class:`PetbreedsError` ends the process with ``error: ...`` and exit 1.

    On success, writes ``reports/run_info/<name>.json`` unless ``write_run_info`` is false (``mlflow_log``,
    which has no outputs).
    """
    root = Path.cwd()
    started = time.time()
    live: MetricsSink | None = None
    try:
        params = load_params(params_path)
        live = _open_live_run(name, root)
        main(params, StageContext(name=name, root=root, live=live))
    except PetbreedsError as e:
        if live is not None:
            live.end("FAILED")
        print(f"error: stage {name}: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        if live is not None:
            live.end("FAILED")
        raise
    if live is not None:
        live.end("FINISHED")
    if write_run_info:
        live_id = live.run_id if live is not None else None
        atomic_write_json(run_info_path(root, name), run_info(name, root, started, time.time(), live_id))
