"""params.yaml under DVC: `dvc exp run -S` rewrites only the keys it sets, and the first stage, check_params,
stops an unknown or invalid key before anything else runs.

Real `dvc` in a temporary git repo holding params.yaml and the check_params stage of dvc.yaml (seconds, no
training); tests/test_pipeline_e2e.py runs the whole pipeline.
"""

from __future__ import annotations

import difflib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
DVC = str(ROOT / ".venv/bin/dvc") if (ROOT / ".venv/bin/dvc").exists() else "dvc"
PIPELINE = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())


def dvc(repo: Path, *args: str, ok: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")}
    env |= {"DVC_NO_ANALYTICS": "1", "PATH": f"{ROOT / '.venv/bin'}:{env['PATH']}"}
    out = subprocess.run([DVC, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert (out.returncode == 0) == ok, f"dvc {' '.join(args)}: exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repo with the project's params.yaml and a dvc.yaml of only its check_params stage, committed."""
    (tmp_path / "stages").mkdir()
    shutil.copy(ROOT / "stages" / "check_params.py", tmp_path / "stages")
    shutil.copy(ROOT / "params.yaml", tmp_path)
    stage = dict(PIPELINE["stages"]["check_params"])
    stage["deps"] = [d for d in stage["deps"] if d.startswith("stages/")]  # the library is the installed one
    with (tmp_path / "dvc.yaml").open("w") as f:
        YAML().dump({"stages": {"check_params": stage}}, f)
    git(tmp_path, "init", "-q")
    dvc(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "baseline")
    return tmp_path


def changed_lines(before: str, after: str) -> list[str]:
    return [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-"]


@pytest.mark.slow
def test_dvc_exp_run_rewrites_only_the_keys_it_sets(repo: Path) -> None:
    before = (repo / "params.yaml").read_text()
    epochs = YAML(typ="safe").load(before)["train_unfrozen"]["epochs"] + 1
    dvc(repo, "exp", "run", "-n", "set", "-S", f"train_unfrozen.epochs={epochs}", "-S", "evaluate.splits=[valid,test]")
    after = (repo / "params.yaml").read_text()
    # the experiment's params.yaml: one line changed, one added, nothing else rewritten
    assert [line[:2] for line in changed_lines(before, after)] == ["- ", "+ ", "+ "], changed_lines(before, after)
    params = YAML(typ="safe").load(after)
    assert params["train_unfrozen"]["epochs"] == epochs and params["evaluate"]["splits"] == ["valid", "test"]


@pytest.mark.slow
def test_an_unknown_key_stops_the_first_stage_with_its_name(repo: Path) -> None:
    before = (repo / "params.yaml").read_text()
    # a key params.yaml lacks: DVC refuses it without `+` and leaves the file alone
    assert "Could not override 'train_frozen.epoch'" in dvc(repo, "exp", "run", "-S", "train_frozen.epoch=3", ok=False)
    assert (repo / "params.yaml").read_text() == before
    # with `+` DVC adds it, and check_params, which depends on every key, stops there with the key's name
    out = dvc(repo, "exp", "run", "-S", "+extra_section=1", ok=False)
    assert "error: stage check_params: params.yaml: unknown key extra_section (known keys under the top level" in out


@pytest.mark.slow
def test_a_null_lr_whose_finder_is_left_out_stops_the_first_stage_with_its_name(repo: Path) -> None:
    # the default train_frozen.lr is null: it trains at lr_find's suggestion, which lr_find.run never leaves out
    out = dvc(repo, "exp", "run", "-S", "lr_find.run=never", ok=False)
    assert "error: stage check_params: params.yaml: train_frozen.lr is null, which trains at lr_find's " in out, out


def test_params_yaml_is_in_the_form_dvc_writes_back(tmp_path: Path) -> None:
    """What `-S` does to the file (DVC's writer, dvc.utils.hydra.apply_overrides) with a key set to its own value:
    nothing may change. A one-line list, a quoted string, `null` or a list ending its section would be rewritten,
    in the diff of every experiment."""
    from dvc.utils.hydra import apply_overrides

    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text)
    apply_overrides(tmp_path / "params.yaml", [f"seed={YAML(typ='safe').load(text)['seed']}"])
    assert changed_lines(text, (tmp_path / "params.yaml").read_text()) == [], "params.yaml: as DVC's writer writes it"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # dvc's own use of pygtrie
def test_check_params_is_the_stage_dvc_runs_first(tmp_path: Path) -> None:
    """DVC runs stages in the order dvc.reproduce plans them: stages that do not depend on each other in dvc.yaml's
    order, so check_params (first there) comes before fetch and everything after it."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path)
    with Repo.init(str(tmp_path), no_scm=True) as repo:
        order = [stage.name for stage in plan_repro(repo.index.graph)]
    assert order[0] == "check_params" and sorted(order) == sorted(PIPELINE["stages"])
