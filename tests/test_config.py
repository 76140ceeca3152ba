from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from petbreeds.config import ParamsError, flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return YAML(typ="safe").load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.fetch.source == "sample"
    assert p.train_unfrozen.lr_slice[0] < p.train_unfrozen.lr_slice[1]
    assert flatten(p)["train_frozen.lr"] is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("split.valid_pct", 1.5, "split.valid_pct must be a number strictly between 0 and 1"),
        ("train_frozen.epochs", -1, "train_frozen.epochs must be an integer >= 0"),
        ("train_frozen.epochs", 2.5, "train_frozen.epochs must be an integer"),
        ("data.size", "big", "data.size must be an integer"),
        ("model.arch", "vgg16", "model.arch must be one of"),
        ("train.channels_last", "yes", "train.channels_last must be true or false"),
        ("train_unfrozen.lr_slice", [1.0e-4, 1.0e-6], "train_unfrozen.lr_slice must be a list [lo, hi]"),
        ("train_unfrozen.lr_slice", 1.0e-4, "train_unfrozen.lr_slice must be a list"),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    raw = raw_params()
    section, name = key.split(".")
    raw[section][name] = value
    with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_params(raw)


def test_unknown_and_missing_keys():
    raw = raw_params()
    raw["train_frozen"]["epochz"] = 3
    with pytest.raises(ParamsError, match="unknown key train_frozen.epochz"):
        parse_params(raw)
    raw = raw_params()
    del raw["data"]["size"]
    with pytest.raises(ParamsError, match="missing key data.size"):
        parse_params(raw)


def test_values_written_by_dvc_exp_run_load(tmp_path):
    """`dvc exp run -S 'train_unfrozen.lr_slice=[1e-6,1e-4]'` writes `- 1e-06`; YAML 1.2 reads floats."""
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("lr_slice: [1.0e-5, 1.0e-3]", "lr_slice:\n  - 1e-06\n  - 0.0001")
    text = text.replace("  lr: null", "  lr: 1e-3")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.train_unfrozen.lr_slice == [1e-06, 0.0001]
    assert p.train_frozen.lr == pytest.approx(1e-3)


def test_float_text_from_a_yaml_1_1_writer_is_a_number():
    raw = copy.deepcopy(raw_params())
    raw["lr_find"]["start_lr"] = "1e-07"
    assert parse_params(raw).lr_find.start_lr == pytest.approx(1e-7)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: [1\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_stage_reports_bad_params_without_traceback(tmp_path):
    raw = (ROOT / "params.yaml").read_text().replace("valid_pct: 0.2", "valid_pct: 1.5")
    (tmp_path / "params.yaml").write_text(raw)
    code = "from petbreeds.stage import run_stage; run_stage('split', lambda p, c: None)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1
    assert "error: stage split: params.yaml: split.valid_pct" in r.stderr
    assert "Traceback" not in r.stderr
