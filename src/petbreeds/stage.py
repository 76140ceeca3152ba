"""What every ``stages/<name>.py`` shares: load params, run, report errors without a traceback.

A stage script is three lines::

    from petbreeds.stage import run_stage

    def main(params, ctx): ...

    if __name__ == "__main__":
        run_stage("train_frozen", main)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from petbreeds.config import Params, load_params
from petbreeds.errors import PetbreedsError


@dataclass
class StageContext:
    """Handed to a stage's ``main``: its name, and a sink for live per-step metrics.

    ``log_metrics`` streams to the live tracking run when one is open (see petbreeds.tracking);
    it never fails the stage.
    """

    name: str
    root: Path

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Stream metrics while the stage runs (no-op without a live tracking run)."""


def run_stage(name: str, main: Callable[[Params, StageContext], None], params_path: str = "params.yaml") -> None:
    """Run a stage's ``main``; a :class:`PetbreedsError` ends the process with ``error: ...`` and exit 1."""
    try:
        params = load_params(params_path)
        main(params, StageContext(name=name, root=Path.cwd()))
    except PetbreedsError as e:
        print(f"error: stage {name}: {e}", file=sys.stderr)
        sys.exit(1)
