"""Resume state: a training stage that was interrupted continues from its last saved epoch and ends with the
outputs an uninterrupted run writes, byte for byte (same machine, same torch build).

    resume = Resume.open("train_frozen", params, world)   # None with resume.every_epochs: 0
    history = fit_one_cycle(model, data, phase, lrs, [ResumeState(resume), ...])   # petbreeds.learn.callbacks
    ...write the stage's outputs...
    resume.finish()                                          # the stage is done: its state goes

The state (``ResumeState`` decides what it holds: model, optimizer, schedule, GradScaler, every RNG of every rank,
the epoch, the history and the per-batch records so far) is ``.cache/resume/<stage>/<key>.pt`` in the project,
written atomically by rank 0. The key is a digest of everything the stage's result depends on, as dvc.yaml lists
it: the command, the content of every dep (code, data, models) and the value of every param. A state of other
code, data or params therefore has another name and is never read; it stays until ``petbreeds resume --clean``.

Why the project's ``.cache`` and not a ``persist: true`` output: DVC keeps no run cache for a stage with a persisted
output, and a queued or ``--temp`` experiment runs in a temporary copy of the project that is deleted when it ends,
killed or not. ``.cache`` is the real project's (``DVC_ROOT``; :func:`petbreeds.runtime.cache_dir`), so the same
experiment queued again finds the state its killed run left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML

from petbreeds.atomic import atomic_output
from petbreeds.config import Params
from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError
from petbreeds.learn.distributed import from_rank_0
from petbreeds.machine import cpu_model
from petbreeds.runtime import cache_dir, project_root
from petbreeds.world import World

STATE_FORMAT = "petbreeds-resume/1"
FOLDER = "resume"


def _dep_files(dep: Path) -> Iterator[Path]:
    if dep.is_dir():
        yield from sorted(p for p in dep.rglob("*") if p.is_file())
    elif dep.exists():
        yield dep


def _param_value(params: dict[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def stage_key(stage: str, root: Path) -> str:
    """A digest of what ``stage``'s result depends on, as ``root``'s dvc.yaml lists it: its command, every dep's
    content (folders file by file, with their paths) and the values of its params (params.yaml)."""
    yaml = YAML(typ="safe")
    try:
        spec = yaml.load((root / "dvc.yaml").read_text())["stages"][stage]
    except (OSError, KeyError, TypeError) as e:
        raise PetbreedsError(f"{root / 'dvc.yaml'}: no stage {stage} to key its resume state by ({e})") from None
    h = hashlib.sha256()
    h.update(json.dumps([STATE_FORMAT, stage, spec.get("cmd")]).encode())
    for dep in sorted(d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])):
        for path in _dep_files(root / dep):
            h.update(str(path.relative_to(root)).encode())
            h.update(file_digest(path, "sha256").encode())
    params_file = yaml.load((root / "params.yaml").read_text()) or {}
    for entry in spec.get("params", []):
        keys = [entry] if isinstance(entry, str) else [k for ks in entry.values() for k in (ks or ["."])]
        for key in keys:
            value = params_file if key == "." else _param_value(params_file, key)
            h.update(json.dumps([key, value], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def _key_or_notice(stage: str) -> str | None:
    """The stage's key in the cwd's project; None, said in one line, where no dvc.yaml lists the stage (a stage
    script run outside a pipeline): with nothing to key by, nothing is saved."""
    try:
        return stage_key(stage, Path.cwd())
    except PetbreedsError as e:
        print(f"{stage}: no resume state: {e}", flush=True)
        return None


def _machine() -> str:
    """What a bit-identical resume needs to be the same: the torch build and the processor that computes."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
    return f"torch {torch.__version__} on {device}"


def rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """This process's RNG states: Python's, NumPy's, torch's (CPU and every CUDA device) and ``generators``'."""
    numpy = np.random.get_state(legacy=False)
    numpy["state"] = {"key": numpy["state"]["key"].tolist(), "pos": numpy["state"]["pos"]}  # weights_only: no arrays
    return {
        "python": random.getstate(),
        "numpy": numpy,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_states(states: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Put back what :func:`rng_states` took."""
    random.setstate(states["python"])
    numpy = states["numpy"]
    np.random.set_state({**numpy, "state": {**numpy["state"], "key": np.array(numpy["state"]["key"], np.uint32)}})
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, g in generators.items():
        g.set_state(states["generators"][name])


@dataclass
class Resume:
    """One training stage's resume state: where it lives, how often it is saved, and who writes it (rank 0)."""

    stage: str
    path: Path | None  # None: resuming is off (resume.every_epochs: 0)
    every_epochs: int
    world: World
    resumed_at: str | None = None  # "epoch 9 of 12" once a state was loaded

    @classmethod
    def open(cls, stage: str, params: Params, world: World) -> Resume:
        """The stage's resume state, keyed by rank 0 from the cwd's project (nothing to key when
        ``params.resume.every_epochs`` is 0: no state is read or written).

        Rank 0 names, in one line, states of the stage that this run cannot use (other code, data or params).
        """
        if params.resume.every_epochs == 0:
            return cls(stage, None, 0, world)
        key = from_rank_0(world, lambda: _key_or_notice(stage))
        if key is None:
            return cls(stage, None, 0, world)
        folder = cache_dir() / FOLDER / stage
        path = folder / f"{key}.pt"
        if world.is_main:
            others = [p for p in folder.glob("*.pt") if p != path]
            if others:
                print(
                    f"{stage}: ignoring {len(others)} resume state(s) of other code, data or params in {folder} "
                    "(`petbreeds resume --clean` removes them)",
                    flush=True,
                )
        return cls(stage, path, params.resume.every_epochs, world)

    def due(self, epochs_done: int, epochs: int) -> bool:
        """Whether to save after ``epochs_done`` epochs of ``epochs`` (never after the last: the outputs follow)."""
        return self.path is not None and epochs_done < epochs and epochs_done % self.every_epochs == 0

    def load(self, epochs: int) -> dict[str, Any] | None:
        """The saved state (rank 0 reads it, every rank gets it), or None when there is none; ``epochs``: the
        stage's, which a state must not have reached. A damaged file is an error naming it and how to discard it."""
        state = from_rank_0(self.world, lambda: self._read(epochs))
        if state is not None:
            self.resumed_at = f"epoch {state['epoch']} of {epochs}"
        return state

    def _read(self, epochs: int) -> dict[str, Any] | None:
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a truncated or foreign file
            raise self.damaged(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("stage") != self.stage:
            raise self.damaged(f"not a {STATE_FORMAT} state of stage {self.stage}")
        missing = sorted({"machine", "epoch", "rng"} - state.keys())
        if missing:
            raise self.damaged(f"no {', '.join(missing)}")
        if len(state["rng"]) != self.world.world_size or not 0 < state["epoch"] < epochs:
            raise self.damaged(
                f"a state of {len(state['rng'])} rank(s) at epoch {state['epoch']}; this run has "
                f"{self.world.world_size} rank(s) and {epochs} epochs"
            )
        if state["machine"] != _machine():
            print(
                f"{self.stage}: the resume state was saved by {state['machine']}, this is {_machine()}: the result "
                "will differ in the last bits from a run that never stopped",
                flush=True,
            )
        return state

    def damaged(self, reason: str) -> PetbreedsError:
        """The error for a state file that cannot be resumed from: what is wrong, and the command that discards it."""
        return PetbreedsError(f"{self.path}: damaged resume state ({reason}); `rm {self.path}` discards it")

    def save(self, state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
        """Write ``state`` with every rank's RNG states (a collective: every rank calls it), rank 0 atomically."""
        rngs = rng_states(generators)
        every_rank: list[Any] = [rngs]
        if self.world.world_size > 1:
            every_rank = [None] * self.world.world_size
            dist.all_gather_object(every_rank, rngs)
        if not self.world.is_main:
            return
        full = {"format": STATE_FORMAT, "stage": self.stage, "machine": _machine(), **state, "rng": every_rank}
        with atomic_output(self.path) as tmp, tmp.open("wb") as f:
            torch.save(full, f)

    def restore_rng(self, state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
        """This rank's RNG states from ``state``."""
        set_rng_states(state["rng"][self.world.rank], generators)

    def facts(self) -> dict[str, str]:
        """For the stage's run_info (and MLflow's tags): where it resumed, if it did."""
        return {} if self.resumed_at is None else {"resumed_at": f"{self.resumed_at} from {self.path}"}

    def finish(self) -> None:
        """The stage wrote its outputs: remove the state (rank 0)."""
        if self.world.is_main and self.path is not None:
            self.path.unlink(missing_ok=True)


def _states(root: Path) -> list[Path]:
    return sorted((root / FOLDER).glob("*/*.pt"))


def resume_cli(argv: list[str]) -> int:
    """``petbreeds resume [--clean [--all]]``: list the training stages' resume states, or remove them."""
    parser = argparse.ArgumentParser(
        prog="petbreeds resume",
        description="The resume states interrupted training stages left in .cache/resume: which this project's "
        "current code, data and params would resume from, and which are stale.",
    )
    parser.add_argument("--clean", action="store_true", help="remove the stale states (of other code, data or params)")
    parser.add_argument("--all", action="store_true", help="with --clean: remove every state, current ones too")
    args = parser.parse_args(argv)
    root = project_root()
    states = _states(cache_dir())
    current = {}
    for stage in sorted({p.parent.name for p in states}):
        try:
            current[stage] = stage_key(stage, root)
        except PetbreedsError:
            current[stage] = None  # no such stage any more: every state of it is stale
    for path in states:
        usable = current[path.parent.name] == path.stem
        if args.clean and (args.all or not usable):
            path.unlink()
            print(f"removed {path}")
        else:
            size = os.path.getsize(path) / 2**20
            print(f"{'current' if usable else 'stale':<8}{path.parent.name:<18}{size:8.1f} MiB  {path}")
    if not states:
        print(f"no resume states in {cache_dir() / FOLDER}")
    return 0
