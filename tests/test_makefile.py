"""`make` on an interpreter older than pyproject.toml's requires-python stops before it creates the venv, with one
line naming the version found and the version needed (scripts/check_python.py, run by the Makefile)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDED = re.fullmatch(
    r">=(\d+)\.(\d+)", tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
)
assert NEEDED is not None, "pyproject.toml: requires-python is no longer >=X.Y; update scripts/check_python.py"


def interpreter_reporting(tmp_path: Path, major: int, minor: int) -> Path:
    """A `python` that runs a script as this interpreter does, but with ``sys.version_info`` saying major.minor: an
    older (or newer) Python as the check sees it. It can run nothing else (no ``-m venv``)."""
    fake = tmp_path / f"python{major}.{minor}"
    code = (
        f"import runpy, sys; sys.version_info = ({major}, {minor}, 0, 'final', 0); sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "{code}" "$@"\n')
    fake.chmod(0o755)
    return fake


def test_make_stops_on_an_older_python_before_it_creates_the_venv(tmp_path: Path) -> None:
    major, minor = int(NEEDED[1]), int(NEEDED[2])
    old = interpreter_reporting(tmp_path, major, minor - 1)
    venv = tmp_path / "venv"
    made = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "install", f"PYTHON={old}", f"VENV={venv}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode != 0, made.stdout + made.stderr
    assert f"is Python {major}.{minor - 1}; petbreeds needs Python {major}.{minor} or newer" in made.stderr, made.stderr
    assert "Traceback" not in made.stderr
    assert not venv.exists()


def test_the_check_passes_the_needed_python_and_newer(tmp_path: Path) -> None:
    major, minor = int(NEEDED[1]), int(NEEDED[2])
    for python in (interpreter_reporting(tmp_path, major, minor), interpreter_reporting(tmp_path, major, minor + 3)):
        checked = subprocess.run([python, "scripts/check_python.py"], cwd=ROOT, capture_output=True, text=True)
        assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
