"""The ``petbreeds`` command's own arguments: usage, --version, -v (the subcommands have their own tests)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from petbreeds import cli
from petbreeds.runtime import VERBOSE_ENV

PETBREEDS = Path(sys.executable).with_name("petbreeds")


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: petbreeds") and "mlflow-relog" in err


def test_help_and_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: petbreeds")
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_version_is_the_installed_distribution_s() -> None:
    out = subprocess.run([str(PETBREEDS), "--version"], capture_output=True, text=True, check=True).stdout
    assert out == f"petbreeds {importlib.metadata.version('petbreeds')}\n"


def test_verbose_flag_reaches_the_environment(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored after the test: main() sets it for the whole process
    assert cli.main(["-v", "--version"]) == 0
    assert os.environ[VERBOSE_ENV] == "1"
    assert capsys.readouterr().out.startswith("petbreeds ")
