"""A training stage's live MLflow child run: per-step curves and ``system/*`` metrics while the stage runs.

``run_stage`` opens one for the stages that ask for it (``live_run=True``) unless ``PETBREEDS_MLFLOW_LIVE=0``;
its id goes into the stage's ``reports/run_info/<stage>.json`` sidecar, through which the parent run built by
``mlflow_log`` (``petbreeds.track.parent_run``) adopts it. The store comes from ``petbreeds.track.store``, the run's
name from ``petbreeds.track.identity``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import Metric
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from petbreeds.runtime import project_root
from petbreeds.track.identity import current_identity
from petbreeds.track.store import log_batch, open_experiment


class LiveRun:
    """A training stage's live child run: per-step metrics, each stamped when it happened, and ``system/*`` metrics.

    The metrics are written to the store every ``flush_every_s`` seconds (and when the run ends), not at every step:
    a training step never waits on SQLite or a tracking server. Best effort: any tracking problem becomes one warning
    and the stage trains on untracked, because the DVC outputs are the record and ``mlflow_log`` builds the complete
    run from them anyway.
    """

    def __init__(
        self, client: MlflowClient, run_id: str, monitor: SystemMetricsMonitor, flush_every_s: float = 2.0
    ) -> None:
        self.client, self.run_id, self.monitor = client, run_id, monitor
        self.flush_every_s = flush_every_s
        self.broken = False
        self.pending: list[Metric] = []
        self.flushed = time.monotonic()

    @classmethod
    def start(cls, stage: str, root: Path) -> LiveRun | None:
        try:
            client, experiment_id = open_experiment(project_root())
            identity = current_identity(root)
            tags = {
                "petbreeds.run_type": "live_stage",
                "dvc.stage": stage,
                "dvc.exp_name": identity.exp_name or "",
                "dvc.baseline_rev": identity.baseline_rev or "",
                "git.commit": identity.git_commit or "",
            }
            run = client.create_run(
                experiment_id, run_name=f"{identity.name}:{stage}", tags={k: v for k, v in tags.items() if v}
            )
            monitor = SystemMetricsMonitor(run.info.run_id, tracking_uri=client.tracking_uri)
            monitor.start()
            return cls(client, run.info.run_id, monitor)
        except Exception as e:  # best effort by design, see the class docstring
            print(f"warning: no live MLflow run for {stage} ({type(e).__name__}: {e}); it trains on", file=sys.stderr)
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.broken:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.flushed >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        """Write the metrics logged since the last flush."""
        batch, self.pending = self.pending, []
        self.flushed = time.monotonic()
        try:
            if not self.broken:
                log_batch(self.client, self.run_id, metrics=batch)
        except Exception as e:  # best effort by design
            self.broken = True
            print(f"warning: live MLflow logging stopped ({type(e).__name__}: {e}); training goes on", file=sys.stderr)

    def end(self, status: str) -> None:
        self.flush()
        try:
            self.monitor.finish()
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # best effort by design
            print(f"warning: could not close live MLflow run {self.run_id} ({e})", file=sys.stderr)
