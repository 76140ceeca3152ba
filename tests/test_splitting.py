"""Stage split: fastai's RandomSplitter on sorted paths, the official lists, the stratified split."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from petbreeds.config import SplitParams
from petbreeds.data.splitting import random_permutation, random_split, split_items, split_metrics
from petbreeds.errors import PetbreedsError

ROOT = Path(__file__).resolve().parents[1]
RANDOM = SplitParams(method="random", valid_pct=0.2, seed=42)


def make_table(sizes: dict[str, int]) -> pd.DataFrame:
    """An index table with ``sizes[label]`` images per label, rows in a scrambled (not path) order."""
    rows = [
        (f"images/{label}_{i}.jpg", label, 32, 24, "JPEG", 1000 + i) for label, n in sizes.items() for i in range(n)
    ]
    table = pd.DataFrame(rows, columns=["path", "label", "width", "height", "format", "bytes"])
    return table.sample(frac=1.0, random_state=0, ignore_index=True)


def valid_paths(table: pd.DataFrame) -> list[str]:
    return sorted(table.loc[table["split"] == "valid", "path"])


@pytest.mark.parametrize("n", [0, 1, 7, 1029, 7390])
def test_local_generator_gives_fastais_permutation_and_leaves_the_global_rng_alone(n: int) -> None:
    torch.manual_seed(42)
    expected = torch.randperm(n).tolist()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert random_permutation(n, 42) == expected
    assert torch.equal(torch.get_rng_state(), state)


def test_random_split_is_fastais_randomsplitter_over_sorted_paths() -> None:
    table = make_table({"Bengal": 23, "beagle": 31})
    out = split_items(table, RANDOM, Path("unused"))

    paths = sorted(table["path"])
    torch.manual_seed(42)
    perm = torch.randperm(len(paths)).tolist()
    cut = int(0.2 * len(paths))
    assert cut == 10
    assert valid_paths(out) == sorted(paths[i] for i in perm[:cut])
    assert out["path"].tolist() == paths
    assert out.drop(columns="split").equals(table.sort_values("path", ignore_index=True))


def test_random_split_does_not_depend_on_input_order() -> None:
    table = make_table({"Bengal": 23, "beagle": 31})
    shuffled = table.sample(frac=1.0, random_state=7, ignore_index=True)
    assert split_items(table, RANDOM, Path("unused")).equals(split_items(shuffled, RANDOM, Path("unused")))


def test_valid_pct_changes_only_the_number_of_validation_items() -> None:
    table = make_table({"Bengal": 40, "beagle": 60})
    at_20 = split_items(table, RANDOM, Path("unused"))
    at_30 = split_items(table, SplitParams(method="random", valid_pct=0.3, seed=42), Path("unused"))
    assert (len(valid_paths(at_20)), len(valid_paths(at_30))) == (20, 30)
    # The same permutation, a longer prefix: every item valid at 0.2 stays valid at 0.3.
    assert set(valid_paths(at_20)) < set(valid_paths(at_30))
    assert at_20.drop(columns="split").equals(at_30.drop(columns="split"))
    other_seed = split_items(table, SplitParams(method="random", valid_pct=0.2, seed=43), Path("unused"))
    assert valid_paths(other_seed) != valid_paths(at_20)


def test_official_split_uses_the_lists_and_keeps_unlisted_images(tmp_path: Path) -> None:
    table = make_table({"Bengal": 6, "beagle": 6})
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    test = ["Bengal_0", "beagle_0", "beagle_1"]
    trainval = [f"Bengal_{i}" for i in range(1, 6)] + [f"beagle_{i}" for i in range(2, 5)] + ["Persian_1"]
    (annotations / "test.txt").write_text("".join(f"{s} 1 1 1\n" for s in test))
    (annotations / "trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n" + "".join(f"{s} 1 1 1\n" for s in trainval)
    )

    out = split_items(table, SplitParams(method="official", valid_pct=0.25, seed=42), tmp_path).set_index("path")
    assert sorted(out.index[out["split"] == "test"]) == [f"images/{s}.jpg" for s in test]
    assert out.loc["images/beagle_5.jpg", "split"] == "unlisted"
    listed = sorted(f"images/{s}.jpg" for s in trainval[:-1])
    assert out.loc[listed, "split"].tolist() == random_split(8, 0.25, 42)
    assert out.loc[listed, "split"].value_counts().to_dict() == {"train": 6, "valid": 2}

    metrics = split_metrics(out.reset_index(), ["Bengal", "beagle"])
    assert {k: metrics[k] for k in ("train", "valid", "test", "unlisted")} == {
        "train": 6,
        "valid": 2,
        "test": 3,
        "unlisted": 1,
    }


def test_official_split_without_the_lists_says_which_file_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PetbreedsError, match=r"test.txt: not found.*split.method: random"):
        split_items(make_table({"Bengal": 3}), SplitParams(method="official", valid_pct=0.2, seed=42), tmp_path)


def test_stratified_split_rounds_per_class_and_keeps_a_training_item() -> None:
    sizes = {"A": 1, "B": 2, "C": 5, "D": 13, "E": 3}
    out = split_items(make_table(sizes), SplitParams(method="stratified", valid_pct=0.2, seed=42), Path("unused"))
    metrics = split_metrics(out, list(sizes))
    # round(0.2 * n): 0.2→0, 0.4→0, 1.0→1, 2.6→3, 0.6→1
    assert {c: m["valid"] for c, m in metrics["per_class"].items()} == {"A": 0, "B": 0, "C": 1, "D": 3, "E": 1}
    assert (metrics["train"], metrics["valid"]) == (19, 5)

    half = split_items(make_table(sizes), SplitParams(method="stratified", valid_pct=0.5, seed=42), Path("unused"))
    # round(0.5 * n), halves to even (2.5→2, 1.5→2, 6.5→6), capped at n - 1 (1→0, 2→1 train kept)
    valid = {c: m["valid"] for c, m in split_metrics(half, list(sizes))["per_class"].items()}
    assert valid == {"A": 0, "B": 1, "C": 2, "D": 6, "E": 2}

    again = split_items(make_table(sizes), SplitParams(method="stratified", valid_pct=0.5, seed=42), Path("unused"))
    assert again.equals(half)


def test_class_absent_from_training_is_an_error_naming_it(tmp_path: Path) -> None:
    # 3 items, int(0.99 * 3) = 2 validate: two classes lose their only image.
    untrained = sorted(["Bengal", "Bombay", "Sphynx"][i] for i in random_permutation(3, 42)[:2])
    with pytest.raises(PetbreedsError, match=rf"no training image left for class\(es\) {', '.join(untrained)};"):
        split_items(
            make_table({"Bombay": 1, "Sphynx": 1, "Bengal": 1}),
            SplitParams(method="random", valid_pct=0.99, seed=42),
            Path("x"),
        )

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "test.txt").write_text("Bombay_0 4 1 4\n")
    (tmp_path / "annotations" / "trainval.txt").write_text("Bengal_0 2 1 2\nBengal_1 2 1 2\n")
    with pytest.raises(PetbreedsError, match=r"split.method official: .*class\(es\) Bombay;"):
        split_items(
            make_table({"Bombay": 1, "Bengal": 2}), SplitParams(method="official", valid_pct=0.2, seed=42), tmp_path
        )


def test_split_metrics_counts_per_split_and_per_class_in_vocab_order() -> None:
    out = split_items(make_table({"Bengal": 10, "beagle": 5}), RANDOM, Path("unused"))
    metrics = split_metrics(out, ["Bengal", "beagle"])
    assert list(metrics) == ["train", "valid", "test", "unlisted", "per_class"]
    assert (metrics["train"], metrics["valid"], metrics["test"], metrics["unlisted"]) == (12, 3, 0, 0)
    assert list(metrics["per_class"]) == ["Bengal", "beagle"]
    assert sum(m["valid"] for m in metrics["per_class"].values()) == 3
    assert all(m["train"] + m["valid"] == {"Bengal": 10, "beagle": 5}[c] for c, m in metrics["per_class"].items())


def test_index_then_split_stages_on_real_files(tmp_path: Path) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    images = tmp_path / "data" / "raw" / "images"
    images.mkdir(parents=True)
    for i in range(10):
        for breed in ("Birman", "pug"):
            Image.effect_noise((16, 16), 32).convert("RGB").save(images / f"{breed}_{i}.jpg")
    for stage in ("index", "split"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "stages" / f"{stage}.py")], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "split: 16 train, 4 valid, 0 test, 0 unlisted"

    split = pd.read_csv(tmp_path / "data" / "split.csv")
    assert split.columns.tolist() == ["path", "label", "width", "height", "format", "bytes", "split"]
    assert valid_paths(split) == sorted(split["path"][i] for i in random_permutation(20, 42)[:4])
    metrics = json.loads((tmp_path / "reports" / "split.json").read_text())
    assert metrics["per_class"]["Birman"]["train"] + metrics["per_class"]["Birman"]["valid"] == 10


def test_real_subset_official_split_matches_its_readme(pet_subset: Path) -> None:
    stems = [p.stem for p in sorted((pet_subset / "images").iterdir())]
    table = pd.DataFrame({"path": [f"images/{s}.jpg" for s in stems], "label": [s.rsplit("_", 1)[0] for s in stems]})
    out = split_items(table, SplitParams(method="official", valid_pct=0.2, seed=42), pet_subset)
    counts = out["split"].value_counts().to_dict()
    assert counts["test"] == 335 and counts["train"] + counts["valid"] == 692
    assert sorted(out.loc[out["split"] == "unlisted", "path"]) == [
        "images/Abyssinian_34.jpg",
        "images/Abyssinian_82.jpg",
    ]
