"""What every ``stages/<name>.py`` shares: load params, run, report errors without a traceback, and leave a
record of who produced the outputs.

A stage script is a ``main`` and one call::

    from petbreeds.stage import run_stage

    def main(params, ctx): ...

    if __name__ == "__main__":
        run_stage("train_frozen", main)

After ``main`` succeeds, ``run_stage`` writes ``reports/run_info/<stage>.json``, a DVC out of every stage
(see ``petbreeds.track.provenance``). Stages that ask for it (``live_run=True``: the training stages) also stream
live metrics into an MLflow child run.

Stages that train (``distributed=True``) run as several processes when ``distributed.nproc_per_node`` or
``distributed.nnodes`` ask for more than one: the script launches itself under torchrun's launcher (or joins
the torchrun that started it), and every rank runs ``main`` with ``ctx.world`` telling it its place. Rank 0
alone writes outputs, the sidecar and the live run; a rank's error ends the whole stage with exit 1.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from petbreeds.atomic import atomic_write_json
from petbreeds.config import Params, load_params
from petbreeds.errors import PetbreedsError
from petbreeds.runtime import quiet_by_default, use_project_cache
from petbreeds.track.provenance import dvc_invocation, run_info, run_info_path
from petbreeds.world import SINGLE_PROCESS, World, under_torchrun, world_size_of

# Tracking switches are env vars, not params: a param change would invalidate the training stages.
LIVE_ENV = "PETBREEDS_MLFLOW_LIVE"


class MetricsSink(Protocol):
    """Where ``StageContext.log_metrics`` streams to (``petbreeds.track.live.LiveRun``)."""

    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def end(self, status: str) -> None: ...


@dataclass
class StageContext:
    """Handed to a stage's ``main``: its name, the folder it runs in, a sink for live per-step metrics, and its
    place among the ranks (``world.is_main``: the process that writes the outputs).

    ``log_metrics`` streams to the live tracking run when one is open (see petbreeds.track.live);
    it never fails the stage. ``record`` keeps facts about how the stage ran for its sidecar.
    """

    name: str
    root: Path
    live: MetricsSink | None = None
    world: World = SINGLE_PROCESS
    facts: dict[str, str] = field(default_factory=dict)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Stream metrics while the stage runs (no-op without a live tracking run)."""
        if self.live is not None:
            self.live.log_metrics(metrics, step)

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """Stream one epoch's history row, its ``epoch`` as the step (``iteration``, the batches so far, is an axis)."""
        self.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "iteration")}, step=int(row["epoch"]))

    def record(self, **facts: str) -> None:
        """Facts about how the stage ran that params.yaml does not say (``precision="bf16"``, what
        ``train.precision: auto`` became): printed by rank 0 and kept in ``reports/run_info/<stage>.json``
        under ``facts``, which MLflow shows as the tags ``stage.<name>.<fact>``."""
        self.facts.update(facts)
        if facts and self.world.is_main:
            print(f"{self.name}: " + ", ".join(f"{key} {value}" for key, value in facts.items()), flush=True)


def phase_argument(argv: Sequence[str] | None = None) -> str:
    """The phase a stage script that serves both phases is run for: its one argument, ``frozen`` or ``unfrozen``
    (``python stages/train.py frozen``, as dvc.yaml's ``cmd`` says); anything else ends with a usage line."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0] not in ("frozen", "unfrozen"):
        sys.exit(f"usage: python {Path(sys.argv[0]).as_posix()} frozen|unfrozen (got {' '.join(args) or 'nothing'})")
    return args[0]


def _open_live_run(name: str, root: Path) -> MetricsSink | None:
    if os.environ.get(LIVE_ENV, "1") == "0":
        return None
    from petbreeds.track.live import LiveRun  # imports mlflow (~3 s): only the training stages pay for it

    return LiveRun.start(name, root)


def run_stage(
    name: str,
    main: Callable[[Params, StageContext], None],
    params_path: str = "params.yaml",
    *,
    distributed: bool = False,
    live_run: bool = False,
    write_run_info: bool = True,
) -> None:
    """Run a stage's ``main``; a :class:`PetbreedsError` ends the process with ``error: ...`` and exit 1.

    ``distributed``: the stage can run as several processes (see the module's docstring).
    ``live_run``: stream the stage's per-step metrics into an MLflow child run while it runs (the training stages).
    On success, writes ``reports/run_info/<name>.json`` unless ``write_run_info`` is false (``mlflow_log``,
    which has no outputs).
    """
    use_project_cache()
    quiet_by_default()  # DVC's output and the queue's logs: the stage's own lines, not MLflow's start-up chatter
    root = Path.cwd()
    started = time.time()
    live: MetricsSink | None = None
    world = SINGLE_PROCESS
    ranked = distributed and under_torchrun()  # one of several processes: the launcher reports its errors
    try:
        params = load_params(params_path)
        if distributed:
            # imported here: torch.distributed costs seconds at start-up, which the other stages need not pay
            from petbreeds.learn import distributed as ddp

            if world_size_of(params.distributed) > 1 and not under_torchrun():
                # rank 0 writes the outputs; the ranks run the script with its arguments (a phase)
                ddp.launch(Path(sys.argv[0]).resolve(), params.distributed, name, sys.argv[1:])
                return
            world = ddp.join(params.distributed)
        live = _open_live_run(name, root) if live_run and world.is_main else None
        ctx = StageContext(name=name, root=root, live=live, world=world)
        main(params, ctx)
    except BaseException as e:
        if live is not None:
            live.end("FAILED")
        if isinstance(e, PetbreedsError):
            message: str | None = str(e)
        elif isinstance(e, Exception) and world.world_size > 1:
            message = ddp.collective_failure(e, params.distributed)  # a peer hung or vanished: not a traceback
        else:
            message = None
        if message is None:
            if ranked and isinstance(e, Exception):
                ddp.record_error(e)  # as torch's @record: the launcher's line names it, the traceback follows here
            raise
        # a rank under torchrun hands its message to the launcher, which reports it with the rank
        if not (ranked and ddp.record_error(PetbreedsError(message))):
            print(f"error: stage {name}: {message}", file=sys.stderr)
            if write_run_info and dvc_invocation() is not None:
                # DVC deletes a stage's outputs (run_info among them) before running it; its cache keeps the previous
                print(
                    f"  DVC removed the stage's previous outputs before running it: `dvc checkout {name}` restores "
                    "them",
                    file=sys.stderr,
                )
        sys.exit(1)
    finally:
        if world.world_size > 1:
            ddp.leave()
    if live is not None:
        live.end("FINISHED")
    if write_run_info and world.is_main:
        live_id = live.run_id if live is not None else None
        info = run_info(name, root, started, time.time(), live_id, world.world_size, ctx.facts)
        atomic_write_json(run_info_path(root, name), info)
