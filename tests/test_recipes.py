"""The book's runs as recipes (recipes/*.yaml, `petbreeds recipe`): each resolves onto params.yaml, through DVC's own
`-S` writer and the words the shell makes of `$(petbreeds recipe NAME)`, to exactly the book's numbers.

The runs themselves need the real dataset and the resnet weights from the internet: not run here.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from petbreeds import cli
from petbreeds.config import FINDER_PHASES, Params, load_params, sweep_runs
from petbreeds.errors import PetbreedsError
from petbreeds.learn.schedule import group_lrs
from petbreeds.track.recipes import find_recipe, recipes

ROOT = Path(__file__).resolve().parents[1]
PETBREEDS = ROOT / ".venv" / "bin" / "petbreeds"


@dataclass(frozen=True)
class Phase:
    """One fit_one_cycle of the book: epochs, the max lr of each of the 3 groups, pct_start, div."""

    epochs: int
    lrs: tuple[float, float, float]
    pct_start: float = 0.25  # fit_one_cycle's defaults
    div: float = 25.0


def fine_tune(epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100) -> tuple[Phase, Phase]:
    """fastai's fine_tune (docs/fastai.md §5): fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99);
    base_lr /= 2; unfreeze; fit_one_cycle(epochs, slice(base_lr/lr_mult, base_lr), pct_start=0.3, div=5.0)."""
    frozen = Phase(freeze_epochs, (base_lr / 10, base_lr / 10, base_lr), pct_start=0.99)
    base_lr /= 2
    lo = base_lr / lr_mult  # slice(lo, base_lr) over 3 groups: even_mults, the middle one their geometric mean
    return frozen, Phase(epochs, (lo, (lo * base_lr) ** 0.5, base_lr), pct_start=0.3, div=5.0)


@dataclass(frozen=True)
class BookRun:
    arch: str
    precision: str
    frozen: Phase
    unfrozen: Phase
    sweeps: tuple[str, ...] = ()  # the lr_find() calls of the run's code: fine_tune makes none


# docs/fastai.md §9: each run on a new vision_learner(dls, arch) of the chapter's data
BOOK = {
    "book-fine-tune": BookRun("resnet34", "fp32", *fine_tune(2)),  # (a) learn.fine_tune(2)
    "book-unfreeze": BookRun(  # (f) fit_one_cycle(3, 3e-3); unfreeze(); lr_find(); fit_one_cycle(6, lr_max=1e-5)
        "resnet34", "fp32", Phase(3, (3e-3, 3e-3, 3e-3)), Phase(6, (1e-5, 1e-5, 1e-5)), sweeps=("lr_find_unfrozen",)
    ),
    "book-discriminative-lr": BookRun(  # (g) ...; unfreeze(); fit_one_cycle(12, lr_max=slice(1e-6, 1e-4))
        "resnet34", "fp32", Phase(3, (3e-3, 3e-3, 3e-3)), Phase(12, (1e-6, 1e-5, 1e-4))
    ),
    "book-resnet50-fp16": BookRun("resnet50", "fp16", *fine_tune(6, freeze_epochs=3)),  # (h) .to_fp16()
}


def check_book_numbers(params: Params, run: BookRun) -> None:
    """Every number of the run as the book has it: its own, and fastai's defaults it relies on."""
    assert params.fetch.source == "oxford-iiit-pet"
    assert (params.split.method, params.split.valid_pct, params.split.seed) == ("random", 0.2, 42)  # RandomSplitter
    data = params.data
    assert (data.item_size, data.size, data.resize_method, data.batch_size) == (460, 224, "crop", 64)
    augment = params.augment  # aug_transforms(size=224, min_scale=0.75): its defaults
    assert (augment.mult, augment.do_flip, augment.max_rotate) == (1, True, 10)
    assert (augment.min_zoom, augment.max_zoom) == (1, 1.1)
    assert (augment.max_warp, augment.max_lighting, augment.p_affine, augment.p_lighting) == (0.2, 0.2, 0.75, 0.75)
    assert augment.min_scale == 0.75
    model = params.model
    assert (model.arch, model.weights, model.resnet50_weights) == (run.arch, "imagenet", "IMAGENET1K_V1")  # book-era
    assert params.train.precision == run.precision
    sweep = params.lr_find  # lr_find()'s defaults
    assert (sweep.start_lr, sweep.end_lr, sweep.num_it, sweep.stop_div) == (1e-7, 10, 100, True)
    assert tuple(finder for finder in FINDER_PHASES if sweep_runs(params, finder)) == run.sweeps
    for phase, book in ((params.train_frozen, run.frozen), (params.train_unfrozen, run.unfrozen)):
        assert phase.lr is not None
        assert group_lrs(phase.lr, 3) == pytest.approx(book.lrs, rel=1e-12)
        assert (phase.epochs, phase.pct_start, phase.div) == (book.epochs, book.pct_start, book.div)
        assert (phase.div_final, phase.wd) == (1e5, 0.01)  # fit_one_cycle's div_final, the learner's wd


def test_every_book_run_is_a_recipe() -> None:
    assert sorted(recipes(ROOT)) == sorted(BOOK)


@pytest.mark.parametrize("name", sorted(BOOK))
def test_a_recipe_resolves_onto_params_yaml_to_the_books_numbers(name: str, tmp_path: Path) -> None:
    """The words bash makes of `$(petbreeds recipe NAME)`, given to DVC's `-S` writer: a valid params.yaml (what
    check_params validates) holding the book's run."""
    words = subprocess.run(
        ["bash", "-c", f'printf "%s\\n" $("{PETBREEDS}" recipe {name})'],
        cwd=tmp_path,  # a folder of files the words could match as globs; the recipes come from the project root
        env={"PATH": "/usr/bin:/bin", "DVC_ROOT": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert words[0::2] == ["-S"] * (len(words) // 2) and len(words) % 2 == 0, words
    assert words[1::2] == find_recipe(ROOT, name).overrides()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply_overrides(tmp_path / "params.yaml", words[1::2])
    check_book_numbers(load_params(tmp_path / "params.yaml"), BOOK[name])


def test_the_default_params_are_not_the_books() -> None:
    """The recipes carry the book's run: the defaults are the sample on 2 CPU cores."""
    with pytest.raises(AssertionError):
        check_book_numbers(load_params(ROOT / "params.yaml"), BOOK["book-fine-tune"])


def test_petbreeds_recipe_lists_the_recipes_one_line_each(monkeypatch, capsys) -> None:
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(ROOT / "stages")  # the project root is found upwards, as dvc finds it
    assert cli.main(["recipe"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, recipe in recipes(ROOT).items():
        (line,) = [line for line in lines if line.startswith(f"{name} ")]
        assert line.split(None, 1)[1] == recipe.description
    assert lines[-1] == "run one: dvc exp run -n NAME $(petbreeds recipe NAME)"
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in BOOK), "README § The book's runs names every recipe"


def test_an_unknown_recipe_or_key_is_an_error_naming_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "typo.yaml").write_text("description: a typo\nparams:\n  train_frozen:\n    epoch: 3\n")
    assert cli.main(["recipe", "book-fine-tune"]) == 1
    message = f"error: no recipe 'book-fine-tune' in {tmp_path / 'recipes'} (the recipes: typo)\n"
    assert capsys.readouterr().err == message
    with pytest.raises(PetbreedsError, match=r"typo.yaml: train_frozen.epoch not in params.yaml"):
        find_recipe(tmp_path, "typo")
    (tmp_path / "recipes" / "typo.yaml").write_text("description: spaces\nparams:\n  fetch:\n    local_path: a b\n")
    with pytest.raises(PetbreedsError, match=r"typo.yaml: fetch.local_path: 'a b' is not a plain number, word or list"):
        find_recipe(tmp_path, "typo")
