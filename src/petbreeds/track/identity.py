"""Which result a parent run records: its name (the DVC experiment, or ``repro@<short sha>``), whether each stage ran
for it or was reused, and the key under which logging it again changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from petbreeds.track.provenance import dvc_invocation, git_commit

PARENT_STAGE = "mlflow_log"  # excluded from the result key: its dvc.lock entry is written after it runs


@dataclass(frozen=True)
class RunIdentity:
    """Names the parent run: the DVC experiment, or ``repro@<short sha>`` for plain ``dvc repro``."""

    name: str
    exp_name: str | None
    baseline_rev: str | None
    git_commit: str | None
    invocation: str | None = None  # the running dvc process (see petbreeds.track.provenance.dvc_invocation)


def repro_name(commit: str | None, uncommitted: str | None = None) -> str:
    """The run name of a plain ``dvc repro`` at ``commit``: ``repro@<short sha>``, or with ``uncommitted`` (see
    :func:`uncommitted_results`) ``repro@<short sha>+dirty-<hash>``: results of params or code not committed yet
    never take the name of the commit's results."""
    name = f"repro@{commit[:7]}" if commit else "repro@no-git"
    return f"{name}+dirty-{uncommitted}" if uncommitted else name


def result_stages(lock: Mapping[str, Any]) -> dict[str, Any]:
    """dvc.lock's (parsed) stages that make the result: every dep, param and out, mlflow_log's left out, as DVC
    writes it after the stage has run."""
    return {k: v for k, v in lock.get("stages", {}).items() if k != PARENT_STAGE}


def _committed_text(root: Path, commit: str, name: str) -> str | None:
    out = subprocess.run(["git", "show", f"{commit}:./{name}"], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout if out.returncode == 0 else None


def _result_inputs(params_text: str | None, lock_text: str | None) -> dict[str, Any]:
    """What makes a result: params.yaml, and dvc.lock's stages."""
    yaml = YAML(typ="safe")
    return {
        "params": yaml.load(params_text) if params_text else None,
        "stages": result_stages((yaml.load(lock_text) if lock_text else None) or {}),
    }


def uncommitted_results(root: Path, commit: str | None) -> str | None:
    """A short hash of the workspace's params.yaml and dvc.lock when they differ from ``commit``'s (after a
    ``dvc repro`` of changed params or code, or an applied experiment), else None."""
    if commit is None:
        return None
    files = ("params.yaml", "dvc.lock")
    here = _result_inputs(*((root / n).read_text(encoding="utf-8") if (root / n).is_file() else None for n in files))
    if here == _result_inputs(*(_committed_text(root, commit, n) for n in files)):
        return None
    return hashlib.sha256(json.dumps(here, sort_keys=True, default=str).encode()).hexdigest()[:8]


def current_identity(root: Path) -> RunIdentity:
    """From the environment DVC gives a stage (``DVC_EXP_NAME``, ``DVC_EXP_BASELINE_REV``)."""
    exp_name = os.environ.get("DVC_EXP_NAME") or None
    commit = git_commit(root)
    return RunIdentity(
        name=exp_name or repro_name(commit, uncommitted_results(root, commit)),
        exp_name=exp_name,
        baseline_rev=os.environ.get("DVC_EXP_BASELINE_REV") or None,
        git_commit=commit,
        invocation=dvc_invocation(),
    )


def stage_status(info: Mapping[str, Any], identity: RunIdentity) -> str:
    """``executed`` by this pipeline run, or ``reused`` (restored from DVC's run cache, or unchanged)."""
    same_exp = (info.get("dvc_exp_name"), info.get("baseline_rev")) == (identity.exp_name, identity.baseline_rev)
    if identity.invocation and info.get("invocation"):
        return "executed" if same_exp and info["invocation"] == identity.invocation else "reused"
    if identity.exp_name:
        return "executed" if same_exp else "reused"
    return "unknown"  # a re-log of a plain `dvc repro`: the sidecars still name their producers


def producer(info: Mapping[str, Any]) -> str:
    """Who made a stage's outputs, from its run_info sidecar: ``<experiment or repro@sha> at <start>``."""
    return f"{info.get('dvc_exp_name') or repro_name(info.get('git_commit'))} at {info.get('started')}"


def result_key(lock: Mapping[str, Any], identity: RunIdentity) -> str:
    """Same name, baseline and dvc.lock (parsed) → the same result: logging it again changes nothing."""
    key = {"name": identity.name, "baseline": identity.baseline_rev, "stages": result_stages(lock)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
