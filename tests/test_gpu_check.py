"""bench/gpu_check.py, the prepared check for a lent GPU machine, dry-run on the CPU at tiny sizes.

The lent machine has neither mlflow nor dvc: the dry run blocks every mlflow* and dvc* import in the check's own
process, through a ``-c`` wrapper, and in every process it starts (pytest and its subprocesses) through a
sitecustomize on PYTHONPATH. So a section that pulls either in fails here as it would there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
# Every mlflow* and dvc* import (mlflow, dvc, dvc_render, ...) raises ImportError, as on the GPU machine.
BLOCK = """import sys


class _NotOnTheGpuMachine:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith(("mlflow", "dvc")):
            raise ImportError(f"{name} is blocked: the GPU machine has neither mlflow nor dvc")
        return None


sys.meta_path.insert(0, _NotOnTheGpuMachine())
"""
WRAPPER = (
    BLOCK
    + "import runpy\n"
    + "sys.argv = [sys.argv[1], '--device', 'cpu', '--tiny', '--budget-s', '480', '--grace-s', '60', '--out', "
    + "sys.argv[2]]\n"
    + "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    + "finally:\n    assert not [m for m in sys.modules if m.startswith(('mlflow', 'dvc'))]\n"
)


def load_gpu_check() -> ModuleType:
    """bench/gpu_check.py as a module (bench/ is a folder of scripts, not a package); importing it runs nothing."""
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_on_cpu_without_mlflow_and_dvc(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(SCRIPT), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # the budget (55 s on an idle 2-core AMD EPYC) with room for a loaded machine
    )
    seconds = time.monotonic() - started
    output = f"{run.stdout[-6000:]}\n{run.stderr[-6000:]}"
    assert run.returncode == 0, f"exit {run.returncode} after {seconds:.0f} s\n{output}"

    table = (out / "gpu_check.md").read_text()
    assert table in run.stdout  # the header and ONE table, printed at the end as written to --out
    assert "# machine:" in table and "# GPU:" in table
    rows = {row["section"]: row for row in json.loads((out / "gpu_check.json").read_text())["rows"]}
    sections = load_gpu_check().SECTIONS
    assert list(rows) == list(sections)
    for name in sections:
        assert f"| {name} |" in table, name
        assert "FAILED" not in rows[name]["result"], f"{name}: {rows[name]['result']}"
        assert not rows[name]["result"].startswith("skipped"), f"{name}: {rows[name]['result']}"
    assert "FAILED" not in table
    assert rows["1 tests (pytest)"]["pytest"].get("passed", 0) > 0
    assert rows["2 sample (generate, index, split)"]["images"] == 37 * 3
    for name in sections[2:-1]:  # every measuring section
        assert rows[name]["images_per_s"] > 0, name
    for name in [n for n in sections if n.startswith(("3 ", "5 "))]:  # the library's calls, profiled
        assert 0 <= rows[name]["wait_share"] <= 1 and rows[name]["profiled_steps"] > 0, name
    assert (out / "pytest.log").is_file()


def test_device_test_files_exist() -> None:
    """The test files the GPU check runs on the lent machine: a renamed or removed file is noticed here."""
    gpu_check = load_gpu_check()
    tiny_files = {test.split("::")[0] for test in gpu_check.TINY_TESTS}
    assert tiny_files and tiny_files <= set(gpu_check.DEVICE_TESTS)
    assert [name for name in gpu_check.DEVICE_TESTS if not (ROOT / name).is_file()] == []
    assert "tests/test_gpu_check.py" not in gpu_check.DEVICE_TESTS


def test_pytest_summary_parsing() -> None:
    counts = load_gpu_check().pytest_counts
    assert counts("....\n= 1 failed, 10 passed, 2 skipped in 3.20s =") == {"failed": 1, "passed": 10, "skipped": 2}
    assert counts("6 passed, 1 skipped in 11.73s") == {"passed": 6, "skipped": 1}
    # killed at the timeout: no summary line, the -q progress so far
    assert counts("..s.....F\n...s [ 40%]\n..") == {"passed so far": 12, "skipped so far": 2, "failed so far": 1}
