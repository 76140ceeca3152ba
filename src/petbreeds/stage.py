"""What every ``stages/<name>.py`` shares: load params, run, report errors without a traceback, and leave a
record of who produced the outputs.

A stage script is a ``main`` and one call::

    from petbreeds.stage import run_stage

    def main(params, ctx): ...

    if __name__ == "__main__":
        run_stage("train_frozen", main)

After ``main`` succeeds, ``run_stage`` writes ``reports/run_info/<stage>.json``, a DVC out of every stage
(see ``petbreeds.provenance``). Stages that ask for it (``live_run=True``: the training stages) also stream
live metrics into an MLflow child run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params, load_params
from petbreeds.errors import PetbreedsError
from petbreeds.provenance import run_info, run_info_path

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


def _open_live_run(name: str, root: Path) -> MetricsSink | None:
    if os.environ.get(LIVE_ENV, "1") == "0":
        return None
    from petbreeds.tracking import LiveRun  # imports mlflow (~3 s): only the training stages pay for it

    return LiveRun.start(name, root)


def run_stage(
    name: str,
    main: Callable[[Params, StageContext], None],
    params_path: str = "params.yaml",
    *,
    live_run: bool = False,
    write_run_info: bool = True,
) -> None:
    """Run a stage's ``main``; a :class:`PetbreedsError` ends the process with ``error: ...`` and exit 1.

    ``live_run``: stream the stage's per-step metrics into an MLflow child run while it runs (the training stages).
    On success, writes ``reports/run_info/<name>.json`` unless ``write_run_info`` is false (``mlflow_log``,
    which has no outputs).
    """
    root = Path.cwd()
    started = time.time()
    live: MetricsSink | None = None
    try:
        params = load_params(params_path)
        live = _open_live_run(name, root) if live_run else None
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
