"""The generated sample: real layout, deterministic bytes, sizes in bounds, parseable official lists."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from petbreeds.config import SampleParams
from petbreeds.data.sample_data import BREEDS, CATS, DOGS, generate_sample

SMALL = SampleParams(per_breed=2, seed=0, min_side=64, max_side=96)


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "raw"
    generate_sample(out, SMALL)
    return out


def test_layout_breeds_and_sizes(sample: Path) -> None:
    images = sorted((sample / "images").iterdir())
    assert len(images) == 37 * 2
    assert {p.name.rsplit("_", 1)[0] for p in images} == set(BREEDS)
    assert sum(b[0].isupper() for b in BREEDS) == 12 and all(b[0].isupper() for b in CATS)
    assert all(b.islower() for b in DOGS) and len(DOGS) == 25
    for path in images:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert all(SMALL.min_side <= side <= SMALL.max_side for side in im.size), (path, im.size)


def test_official_lists_parse(sample: Path) -> None:
    text = (sample / "annotations" / "list.txt").read_text()
    header = [ln for ln in text.splitlines() if ln.startswith("#")]
    assert header[0] == "#Image CLASS-ID SPECIES BREED ID" and len(header) == 6
    rows = [ln.split() for ln in text.splitlines() if not ln.startswith("#")]
    table = {name: (int(c), int(s), int(b)) for name, c, s, b in rows}
    assert set(table) == {p.stem for p in (sample / "images").iterdir()}
    # The official numbering: class ids alphabetical (case-insensitive), breed ids within each species.
    assert table["Abyssinian_1"] == (1, 1, 1) and table["american_bulldog_2"] == (2, 2, 1)
    assert table["Sphynx_1"] == (34, 1, 12) and table["yorkshire_terrier_1"] == (37, 2, 25)
    trainval = [ln.split()[0] for ln in (sample / "annotations" / "trainval.txt").read_text().splitlines()]
    test = [ln.split()[0] for ln in (sample / "annotations" / "test.txt").read_text().splitlines()]
    assert len(trainval) == len(test) == 37 and set(trainval) | set(test) == set(table)
    assert not set(trainval) & set(test)


def test_same_params_same_bytes_other_seed_other_bytes(sample: Path, tmp_path: Path) -> None:
    generate_sample(tmp_path / "again", SMALL)
    assert tree_hash(tmp_path / "again") == tree_hash(sample)
    generate_sample(tmp_path / "seed1", SampleParams(per_breed=2, seed=1, min_side=64, max_side=96))
    assert tree_hash(tmp_path / "seed1") != tree_hash(sample)
    assert len(list((tmp_path / "seed1" / "images").iterdir())) == 74


def test_an_image_does_not_depend_on_how_many_are_drawn(sample: Path, tmp_path: Path) -> None:
    generate_sample(tmp_path / "more", SampleParams(per_breed=3, seed=0, min_side=64, max_side=96))
    for name in ("Bengal_2.jpg", "pug_1.jpg"):
        assert (tmp_path / "more" / "images" / name).read_bytes() == (sample / "images" / name).read_bytes()


def test_regenerating_replaces_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    (out / "images").mkdir(parents=True)
    (out / "images" / "leftover.jpg").write_bytes(b"old")
    generate_sample(out, SampleParams(per_breed=1, seed=0, min_side=64, max_side=64))
    assert not (out / "images" / "leftover.jpg").exists() and len(list((out / "images").iterdir())) == 37
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary folder left behind
