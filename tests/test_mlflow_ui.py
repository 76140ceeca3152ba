"""The MLflow UI shows our runs: a real `mlflow ui` on a free localhost port, opened in headless Chromium with a
fresh profile (as a user who never touched the UI's GenAI / Model training toggle).

Chromium is the Debian package `chromium` (.ci/run installs it). Without it the test skips locally and fails
under CI (env CI set), so CI always runs it.
"""

from __future__ import annotations

import html
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from petbreeds.track.parent_run import log_pipeline
from petbreeds.track.store import open_experiment, ui_url


def chromium_flags() -> list[str]:
    """Headless Chromium as scripts/pictures.py runs it for docs/img/mlflow_run.png (one list for both)."""
    spec = importlib.util.spec_from_file_location("scripts_pictures", Path(__file__).parents[1] / "scripts/pictures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module.CHROMIUM_FLAGS


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message + ": CI must run the browser test")
        pytest.skip(message)
    return found


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, "mlflow ui exited"
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"mlflow ui not healthy at {url} after {timeout_s} s")


def page_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


@pytest.mark.slow
def test_the_printed_link_lists_the_runs_and_the_run_page_shows_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_fake_outputs, exp_identity, free_port
) -> None:
    browser = chromium()
    project = tmp_path / "project"
    write_fake_outputs(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_pipeline(project, exp_identity("exp-ui-other"), project)
    run_id = log_pipeline(project, exp_identity("exp-ui"), project)
    experiment_id = open_experiment(project)[1]

    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{project}/mlflow.db"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = (tmp_path / "ui.log").open("w")
    server = subprocess.Popen(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, server)
        common = [browser, *chromium_flags(), f"--user-data-dir={tmp_path / 'chromium'}"]
        # the link `make ui` prints
        runs_url = ui_url(project, base)
        runs_dom = subprocess.run([*common, "--dump-dom", runs_url], capture_output=True, text=True, timeout=180).stdout
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        screenshot = tmp_path / "mlflow_run.png"
        shot = [*common, "--hide-scrollbars", "--window-size=1400,1100", f"--screenshot={screenshot}", url]
        subprocess.run(shot, capture_output=True, timeout=180, check=True)
    finally:
        server.terminate()
        server.wait(timeout=30)

    runs = page_text(runs_dom)
    # the training view: its sidebar has the model registry, the GenAI view's has Observability and no runs table
    assert "Model registry" in runs and "Observability" not in runs, runs
    assert "Run Name" in runs and "2 matching runs" in runs
    assert " exp-ui " in runs and " exp-ui-other " in runs  # the runs table, by name

    text = page_text(dom)
    assert "exp-ui" in text
    assert "Duration 9.0s" in text  # the stages' times (tests/conftest.py's sidecars), not the logging's
    assert "evaluate/error_rate 0.25" in text  # the Metrics table: key, then value
    assert "oxford-iiit-pet (sample)" in text  # the dataset input
    assert screenshot.stat().st_size > 10_000
