from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from petbreeds.config import ParamsError, flatten, load_params, parse_params, sweep_runs

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return YAML(typ="safe").load((ROOT / "params.yaml").read_text())


def test_default_params_load():
    p = load_params(ROOT / "params.yaml")
    assert p.fetch.source == "sample"
    assert p.train_unfrozen.lr[0] < p.train_unfrozen.lr[1]
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
        ("train_unfrozen.lr", [1.0e-4, 1.0e-6], "train_unfrozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_unfrozen.lr", "1e-4x", "train_unfrozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_unfrozen.lr", ["a", 1.0e-4], "train_unfrozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.epochs", True, "train_frozen.epochs must be an integer >= 0, got True"),  # strict: no bools
        ("train_frozen.epochs", "3", "train_frozen.epochs must be an integer >= 0, got '3'"),  # nor text
        ("data.batch_size", 32.0, "data.batch_size must be an integer > 0, got 32.0"),
        ("augment.do_flip", 1, "augment.do_flip must be true or false, got 1"),
        ("augment.mult", True, "augment.mult must be a number >= 0, got True"),
        ("train_frozen.lr", "fast", "train_frozen.lr must be a number > 0, a list [lo, hi] with 0 < lo <= hi"),
        ("train_frozen.lr", -1.0, "train_frozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.lr", [1.0e-3, 1.0e-5], "train_frozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.lr", [], "train_frozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.lr", [0.0], "train_frozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.lr", [1e-5, 1e-4, 1e-3], "train_frozen.lr must be a number > 0, a list [lo, hi]"),
        ("train_frozen.lr", ["a"], "train_frozen.lr must be a number > 0, a list [lo, hi] with 0 < lo <= hi (fast"),
        ("evaluate.splits", ["valid", "valid"], "evaluate.splits must be a non-empty list of valid/test"),
        ("evaluate.splits", ["train"], "evaluate.splits must be a non-empty list of valid/test, got ['train']"),
        ("distributed.backend", "mpi", "distributed.backend must be one of 'auto', 'nccl', 'gloo', got 'mpi'"),
        ("fetch.local_path", 3, "fetch.local_path must be a string, got 3"),
        (
            "fetch.sample",
            None,
            "fetch.sample must be a mapping with keys per_breed, seed, min_side, max_side, got None",
        ),
    ],
)
def test_bad_values_name_the_key(key, value, message):
    raw = raw_params()
    *sections, name = key.split(".")
    section = raw
    for part in sections:
        section = section[part]
    section[name] = value
    with pytest.raises(ParamsError, match="^params.yaml: " + re.escape(message)):
        parse_params(raw)


def test_exact_messages():
    raw = raw_params()
    raw["split"]["valid_pct"] = 1.5
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == "params.yaml: split.valid_pct must be a number strictly between 0 and 1, got 1.5"
    raw = raw_params()
    raw["train_frozen"]["epochs"] = -1
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == "params.yaml: train_frozen.epochs must be an integer >= 0, got -1"
    raw = raw_params()
    raw["lr_find"]["end_lr"] = raw["lr_find"]["start_lr"]
    raw["augment"]["max_zoom"] = 0.5
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == (
        "params.yaml: augment.max_zoom must be >= augment.min_zoom; lr_find.end_lr must be > lr_find.start_lr"
    )


def test_distributed_cross_checks():
    raw = raw_params()
    raw["distributed"]["nproc_per_node"] = 3
    raw["distributed"]["nnodes"] = 2
    with pytest.raises(ParamsError, match="data.batch_size 32 is the global batch and must divide evenly over the 6 "):
        parse_params(raw)
    raw["distributed"]["nproc_per_node"] = 2
    with pytest.raises(ParamsError, match="distributed.rdzv_endpoint is empty but distributed.nnodes > 1"):
        parse_params(raw)
    raw["distributed"]["rdzv_endpoint"] = "node0:29400"
    assert parse_params(raw).distributed.nnodes == 2


def test_an_integer_is_a_number():
    raw = raw_params()
    raw["lr_find"]["end_lr"] = 10
    raw["train_unfrozen"]["lr"] = [1, 2]
    raw["train_frozen"]["lr"] = 1
    p = parse_params(raw)
    assert p.lr_find.end_lr == 10.0 and type(p.lr_find.end_lr) is float
    assert p.train_unfrozen.lr == [1.0, 2.0] and all(type(v) is float for v in p.train_unfrozen.lr)
    assert type(p.train_frozen.lr) is float


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3.0e-3, 3.0e-3), (None, None), ([1.0e-6, 1.0e-4], [1.0e-6, 1.0e-4]), ([2.0e-3], [2.0e-3]), (["2e-3"], [2e-3])],
)
@pytest.mark.parametrize("phase", ["train_frozen", "train_unfrozen"])
def test_a_phase_lr_takes_fastais_forms(value, expected, phase):
    # a float, slice(lo, hi) as [lo, hi], slice(hi) as [hi], or null (the suggestion of the phase's lr finder)
    raw = raw_params()
    raw[phase]["lr"] = value
    assert getattr(parse_params(raw), phase).lr == expected


def test_params_are_frozen_and_flatten_like_the_yaml():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(ValueError):
        p.data.batch_size = 8  # type: ignore[misc]
    assert p.data.model_copy(update={"num_workers": 0}).num_workers == 0
    assert flatten(p) == flatten(raw_params())  # same keys, order and values as the plain mapping
    assert list(flatten(p)) == list(flatten(raw_params()))


def test_unknown_and_missing_keys():
    raw = raw_params()
    raw["train_frozen"]["epochz"] = 3
    with pytest.raises(ParamsError, match="unknown key train_frozen.epochz"):
        parse_params(raw)
    raw = raw_params()
    raw["fetch"]["sample"]["per_bread"] = 3
    raw["fetch"]["sample"]["colour"] = "red"
    raw["data"]["size"] = -1  # an unknown key is reported first: a typo there may explain the rest
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == (
        "params.yaml: unknown key fetch.sample.colour, fetch.sample.per_bread "
        "(known keys under fetch.sample: per_breed, seed, min_side, max_side)"
    )
    raw = raw_params()
    raw["mlflow"] = {}
    with pytest.raises(ParamsError, match=r"unknown key mlflow \(known keys under the top level: seed, fetch, index"):
        parse_params(raw)
    raw = raw_params()
    del raw["data"]["size"]
    with pytest.raises(ParamsError, match=r"^params.yaml: missing key data.size \(expected an integer > 0\)$"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="^params.yaml: the top level must be a mapping with keys seed, fetch, "):
        parse_params(None)  # an empty params.yaml


def test_values_written_by_dvc_exp_run_load(tmp_path):
    """`dvc exp run -S 'train_unfrozen.lr=[1e-6,1e-4]'` writes `- 1e-06`; YAML 1.2 reads floats."""
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("  - 1.0e-5\n  - 1.0e-3\n", "  - 1e-06\n  - 0.0001\n")
    text = text.replace("  lr:                         # a number", "  lr: 1e-3                    # a number")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    p = load_params(path)
    assert p.train_unfrozen.lr == [1e-06, 0.0001]
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


@pytest.mark.parametrize(
    ("run", "frozen_lr", "unfrozen_lr", "sweeps"),
    [
        ("always", None, [1e-5, 1e-3], ["lr_find", "lr_find_unfrozen"]),  # the book's text: both, used or not
        ("always", [2e-3], [1e-5, 1e-3], ["lr_find", "lr_find_unfrozen"]),
        ("auto", None, [1e-5, 1e-3], ["lr_find"]),  # only where a null lr trains at the suggestion
        ("auto", 3e-3, None, ["lr_find_unfrozen"]),
        ("auto", [2e-3], [1e-5, 1e-3], []),  # fine_tune: no sweep
        ("never", 3e-3, 1e-5, []),
        (["lr_find_unfrozen"], 3e-3, 1e-5, ["lr_find_unfrozen"]),  # the book's unfreeze run: lr_find() after unfreeze()
        (["lr_find", "lr_find_unfrozen"], 3e-3, 1e-5, ["lr_find", "lr_find_unfrozen"]),
        ([], 3e-3, 1e-5, []),
    ],
)
def test_lr_find_run_says_which_finders_sweep(run, frozen_lr, unfrozen_lr, sweeps):
    raw = raw_params()
    raw["lr_find"]["run"], raw["train_frozen"]["lr"], raw["train_unfrozen"]["lr"] = run, frozen_lr, unfrozen_lr
    p = parse_params(raw)
    assert [finder for finder in ("lr_find", "lr_find_unfrozen") if sweep_runs(p, finder)] == sweeps


def test_the_default_runs_both_finders_as_the_books_text():
    p = load_params(ROOT / "params.yaml")
    assert p.lr_find.run == "always" and sweep_runs(p, "lr_find") and sweep_runs(p, "lr_find_unfrozen")
    raw = raw_params()
    del raw["lr_find"]["run"]  # a params.yaml from before the key: as before, both sweep
    assert parse_params(raw).lr_find.run == "always"


@pytest.mark.parametrize(
    ("run", "phase", "shown"),
    [("never", "train_frozen", "never"), (["lr_find"], "train_unfrozen", "[lr_find]")],
)
def test_a_null_lr_whose_finder_does_not_sweep_names_the_key(run, phase, shown):
    raw = raw_params()
    raw["lr_find"]["run"], raw["train_frozen"]["lr"], raw["train_unfrozen"]["lr"] = run, 3e-3, 1e-5
    raw[phase]["lr"] = None
    finder = {"train_frozen": "lr_find", "train_unfrozen": "lr_find_unfrozen"}[phase]
    with pytest.raises(ParamsError) as e:
        parse_params(raw)
    assert str(e.value) == (
        f"params.yaml: {phase}.lr is null, which trains at {finder}'s suggestion, but lr_find.run is {shown}, which "
        f"does not run {finder}: set {phase}.lr, or lr_find.run to auto"
    )


@pytest.mark.parametrize("run", ["sometimes", ["lr_find", "lr_find"], ["train_frozen"], True])
def test_lr_find_run_is_a_rule_or_a_list_of_finders(run):
    raw = raw_params()
    raw["lr_find"]["run"] = run
    with pytest.raises(ParamsError, match=r"^params.yaml: lr_find.run must be always, auto .* got "):
        parse_params(raw)
