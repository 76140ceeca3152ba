"""Stage index on real files: JPEGs written with Pillow in the archive's layout, plus the real archive's quirks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from petbreeds.config import IndexParams
from petbreeds.data.labelling import find_image_files, index_images
from petbreeds.errors import PetbreedsError

ROOT = Path(__file__).resolve().parents[1]
PARAMS = IndexParams(label_regex=r"(.+)_\d+.jpg$", min_class_images=2, workers=1)
# the exclusion reasons of the other labellers (parent_folder, csv): none with file names and a regex
NO_OTHER_REASON = dict.fromkeys(("no_class_folder", "not_in_csv", "csv_file_missing", "csv_outside_source"), 0)


def write_image(path: Path, size: tuple[int, int] = (24, 16), mode: str = "RGB", fmt: str = "JPEG") -> Path:
    """A real image file; noise, so that JPEG data is long enough to truncate mid-scan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise(size, 64).convert(mode).save(path, format=fmt)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    write_image(path, size=(64, 64))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """A tiny data/raw: dogs and cats, the real archive's disguised formats, and broken or unlabelled files."""
    images = tmp_path / "raw" / "images"
    write_image(images / "basset_hound_1.jpg", size=(30, 20))
    write_image(images / "Bengal_1.jpg", size=(20, 30))
    write_image(images / "Bengal_2.jpg", fmt="GIF", mode="P")  # Abyssinian_34.jpg in the archive is a GIF
    write_image(images / "Abyssinian_5.jpg", mode="RGBA", fmt="PNG")  # and Abyssinian_5.jpg an RGBA PNG
    write_image(images / "Abyssinian_10.jpg")
    write_image(images / "extra" / "Birman_1.jpg")  # found recursively
    write_truncated_jpeg(images / "beagle_1.jpg")
    (images / "beagle_2.jpg").touch()
    write_image(images / "Abyssinian_7.png", fmt="PNG")  # an image, but the book's regex wants .jpg
    write_image(images / ".hidden_1.jpg")  # skipped like fastai: hidden file,
    write_image(images / ".cache" / "Persian_1.jpg")  # dot-folder,
    (images / "Abyssinian_1.mat").write_bytes(b"not an image")  # not an image extension
    return tmp_path / "raw"


def test_index_keeps_disguised_formats_and_excludes_broken_files_with_reasons(raw: Path) -> None:
    result = index_images(raw, PARAMS)

    assert result.table.columns.tolist() == ["path", "label", "width", "height", "format", "bytes"]
    assert result.table[["path", "label", "format"]].values.tolist() == [
        ["images/Abyssinian_10.jpg", "Abyssinian", "JPEG"],
        ["images/Abyssinian_5.jpg", "Abyssinian", "PNG"],
        ["images/Bengal_1.jpg", "Bengal", "JPEG"],
        ["images/Bengal_2.jpg", "Bengal", "GIF"],
        ["images/basset_hound_1.jpg", "basset_hound", "JPEG"],
        ["images/extra/Birman_1.jpg", "Birman", "JPEG"],
    ]
    bengal_1 = result.table.set_index("path").loc["images/Bengal_1.jpg"]
    assert (bengal_1["width"], bengal_1["height"]) == (20, 30)
    assert bengal_1["bytes"] == (raw / "images/Bengal_1.jpg").stat().st_size

    excluded = result.excluded.set_index("path")
    assert excluded["reason"].to_dict() == {
        "images/Abyssinian_7.png": "no_label_match",
        "images/beagle_1.jpg": "undecodable",
        "images/beagle_2.jpg": "empty",
    }
    assert "truncated" in excluded.loc["images/beagle_1.jpg", "detail"]

    assert result.metrics() == {
        "images": 6,
        "classes": 4,
        "excluded_total": 3,
        "excluded": {"empty": 1, "no_label_match": 1, "unknown_class": 0, "undecodable": 1} | NO_OTHER_REASON,
        "small_classes": 2,
        "per_class": {"Abyssinian": 2, "Bengal": 2, "Birman": 1, "basset_hound": 1},
    }
    assert result.summary() == "index: 6 images, 4 classes, 3 excluded (1 empty, 1 no_label_match, 1 undecodable)"


def test_vocab_is_case_sensitive_sorted_so_cats_come_first(tmp_path: Path) -> None:
    for name in ["yorkshire_terrier_1", "Sphynx_1", "american_bulldog_1", "Abyssinian_1", "Ragdoll_1"]:
        write_image(tmp_path / "images" / f"{name}.jpg")
    vocab = index_images(tmp_path, PARAMS).vocab
    assert vocab == ["Abyssinian", "Ragdoll", "Sphynx", "american_bulldog", "yorkshire_terrier"]


def test_label_is_regex_group_one_on_the_file_name(tmp_path: Path) -> None:
    # The greedy (.+) keeps every underscore but the last; the folder name plays no part.
    write_image(tmp_path / "images" / "great_pyrenees_12_3.jpg")
    write_image(tmp_path / "images" / "sub_9" / "Bombay_1.JPG")  # found (suffix lower-cased), label regex wants .jpg
    result = index_images(tmp_path, PARAMS)
    assert result.table["label"].tolist() == ["great_pyrenees_12"]
    assert result.excluded["path"].tolist() == ["images/sub_9/Bombay_1.JPG"]
    species = index_images(tmp_path, IndexParams(label_regex=r"^([a-z]|[A-Z])", min_class_images=2, workers=1))
    assert species.table["label"].tolist() == ["g", "B"]


def test_find_image_files_follows_fastai_rules(tmp_path: Path) -> None:
    for name in ["b.jpg", "a.JPEG", "c.png", "d.gif", "e.tif", "f.txt", "g.mat", ".h.jpg", ".dir/i.jpg", "x/j.bmp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert find_image_files(tmp_path) == ["a.JPEG", "b.jpg", "c.png", "d.gif", "e.tif", "x/j.bmp"]


def test_parallel_check_gives_the_same_result_as_serial(raw: Path) -> None:
    serial = index_images(raw, PARAMS)
    for workers in (2, 0):
        parallel = index_images(raw, IndexParams(label_regex=PARAMS.label_regex, min_class_images=2, workers=workers))
        pd.testing.assert_frame_equal(parallel.table, serial.table)
        pd.testing.assert_frame_equal(parallel.excluded, serial.excluded)
        assert parallel.vocab == serial.vocab


def test_zero_usable_images_names_the_folder_and_the_regex(tmp_path: Path) -> None:
    write_image(tmp_path / "images" / "cover.jpg")
    (tmp_path / "images" / "Bengal_1.jpg").touch()
    with pytest.raises(PetbreedsError, match=r"images: no usable image .*1 empty, 1 no_label_match.*label_regex"):
        index_images(tmp_path, PARAMS)


def test_missing_images_folder_and_regex_without_group_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PetbreedsError, match=r"images: not found.*dvc repro fetch"):
        index_images(tmp_path, PARAMS)
    write_image(tmp_path / "images" / "Bengal_1.jpg")
    with pytest.raises(PetbreedsError, match="index.label_regex"):
        index_images(tmp_path, IndexParams(label_regex=r"_\d+.jpg$", min_class_images=2, workers=1))


def test_annotated_class_without_usable_image_is_an_error(raw: Path) -> None:
    list_txt = raw / "annotations" / "list.txt"
    list_txt.parent.mkdir()
    list_txt.write_text("#Image CLASS-ID SPECIES BREED ID\nAbyssinian_10 1 1 1\nBengal_1 6 1 6\n")
    assert index_images(raw, PARAMS).vocab == ["Abyssinian", "Bengal"]  # Birman, basset_hound: unknown_class

    list_txt.write_text(list_txt.read_text() + "beagle_1 13 2 5\nbeagle_2 13 2 5\nPersian_1 8 1 8\n")
    with pytest.raises(PetbreedsError, match=r"list.txt lists class\(es\) Persian, beagle") as err:
        index_images(raw, PARAMS)
    assert "images/beagle_1.jpg: undecodable; images/beagle_2.jpg: empty" in str(err.value)


def write_list_txt(raw: Path, stems: list[str]) -> Path:
    """``annotations/list.txt`` in the official format, naming ``stems`` (class ids do not matter to index)."""
    list_txt = raw / "annotations" / "list.txt"
    list_txt.parent.mkdir(parents=True, exist_ok=True)
    list_txt.write_text("#Image CLASS-ID SPECIES BREED ID\n" + "".join(f"{stem} 1 1 1\n" for stem in stems))
    return list_txt


@pytest.fixture
def stray_raw(tmp_path: Path) -> Path:
    """Two real breeds of 3 images each, and a camera's file that the book's regex labels "IMG"."""
    images = tmp_path / "raw" / "images"
    for n in range(1, 4):
        write_image(images / f"Bengal_{n}.jpg")
        write_image(images / f"pug_{n}.jpg")
    write_image(images / "IMG_0001.jpg", size=(64, 48))
    return tmp_path / "raw"


def test_label_not_in_list_txt_is_excluded_as_unknown_class(stray_raw: Path) -> None:
    list_txt = write_list_txt(stray_raw, [f"{breed}_{n}" for breed in ("Bengal", "pug") for n in range(1, 4)])
    result = index_images(stray_raw, PARAMS)
    assert result.vocab == ["Bengal", "pug"]
    assert result.excluded.values.tolist() == [
        ["images/IMG_0001.jpg", "unknown_class", f"label 'IMG' is not one of the classes in {list_txt}"]
    ]
    assert result.metrics()["excluded"]["unknown_class"] == 1 and result.metrics()["small_classes"] == 0
    assert result.summary() == "index: 6 images, 2 classes, 1 excluded (1 unknown_class)"
    assert result.warning() is None


def test_without_list_txt_a_small_class_is_kept_and_named_in_a_warning(stray_raw: Path) -> None:
    result = index_images(stray_raw, PARAMS)
    assert result.vocab == ["Bengal", "IMG", "pug"] and result.excluded.empty
    assert result.small_classes == ["IMG"] and result.metrics()["small_classes"] == 1
    warning = result.warning()
    assert warning.startswith("warning: index: class(es) IMG (1 image) have fewer than index.min_class_images=2 ")
    assert "move or rename them in fetch.local_path" in warning and "tighten index.label_regex" in warning

    three = index_images(stray_raw, IndexParams(label_regex=PARAMS.label_regex, min_class_images=4, workers=1))
    assert three.small_classes == ["Bengal", "IMG", "pug"]
    assert "class(es) Bengal (3 images), IMG (1 image), pug (3 images) have fewer than" in three.warning()


def test_a_normal_dataset_gives_no_warning(stray_raw: Path) -> None:
    (stray_raw / "images" / "IMG_0001.jpg").unlink()
    for params in (PARAMS, IndexParams(label_regex=PARAMS.label_regex, min_class_images=3, workers=1)):
        result = index_images(stray_raw, params)
        assert result.small_classes == [] and result.warning() is None
    assert result.metrics()["small_classes"] == 0 and result.metrics()["excluded_total"] == 0


def run_index_stage(raw: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    shutil.copy(ROOT / "params.yaml", workdir / "params.yaml")
    (workdir / "data").mkdir()
    shutil.copytree(raw, workdir / "data" / "raw")
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "index.py")], cwd=workdir, capture_output=True, text=True, check=False
    )


def test_index_stage_writes_every_output(raw: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "project"
    workdir.mkdir()
    done = run_index_stage(raw, workdir)
    assert done.returncode == 0, done.stderr
    assert "index: 6 images, 4 classes, 3 excluded" in done.stdout
    # the decode check's progress, not a terminal: its bar's text as a line per ~10 %, at most one per image here
    decoding = [line for line in done.stderr.splitlines() if line.startswith("index: decoding")]
    assert decoding and len(decoding) <= 7 and decoding[-1].startswith("index: decoding: 100%|")

    index = pd.read_csv(workdir / "data" / "index.csv")
    assert index.columns.tolist() == ["path", "label", "width", "height", "format", "bytes"]
    assert len(index) == 6 and index["path"].is_monotonic_increasing
    assert json.loads((workdir / "data" / "vocab.json").read_text()) == {
        "vocab": ["Abyssinian", "Bengal", "Birman", "basset_hound"]
    }
    excluded = pd.read_csv(workdir / "reports" / "index_excluded.csv")
    assert excluded.columns.tolist() == ["path", "reason", "detail"]
    assert excluded["reason"].tolist() == ["no_label_match", "undecodable", "empty"]
    metrics = json.loads((workdir / "reports" / "index.json").read_text())
    assert metrics["excluded_total"] == 3 and metrics["per_class"]["Abyssinian"] == 2
    assert not list(workdir.rglob(".*.tmp*")), "atomic writes left temporary files behind"


def test_index_stage_reports_stray_files(stray_raw: Path, tmp_path: Path) -> None:
    """The stage's files and console with IMG_0001.jpg among the images: excluded when list.txt exists, else kept
    with a warning on stderr and counted in reports/index.json."""
    (tmp_path / "warned").mkdir()
    done = run_index_stage(stray_raw, tmp_path / "warned")
    assert done.returncode == 0, done.stderr
    assert "\nwarning: index: class(es) IMG (1 image) have fewer than index.min_class_images=2" in "\n" + done.stderr
    metrics = json.loads((tmp_path / "warned" / "reports" / "index.json").read_text())
    assert metrics["small_classes"] == 1 and metrics["per_class"]["IMG"] == 1 and metrics["excluded_total"] == 0
    assert all(isinstance(v, int) for v in metrics["excluded"].values())  # numbers only: MLflow logs them as metrics
    assert "index_excluded.csv" not in done.stdout  # nothing excluded: no report to point at

    write_list_txt(stray_raw, [f"{breed}_{n}" for breed in ("Bengal", "pug") for n in range(1, 4)])
    (tmp_path / "listed").mkdir()
    done = run_index_stage(stray_raw, tmp_path / "listed")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert (
        "index: 6 images, 2 classes, 1 excluded (1 unknown_class); each file and why: reports/index_excluded.csv"
        in (done.stdout)
    )
    excluded = pd.read_csv(tmp_path / "listed" / "reports" / "index_excluded.csv")
    assert excluded[["path", "reason"]].values.tolist() == [["images/IMG_0001.jpg", "unknown_class"]]
    assert "data/raw/annotations/list.txt" in excluded["detail"][0]
    metrics = json.loads((tmp_path / "listed" / "reports" / "index.json").read_text())
    assert (
        metrics["excluded"]["unknown_class"] == 1
        and metrics["small_classes"] == 0
        and "IMG" not in metrics["per_class"]
    )


def test_index_stage_reports_bad_data_without_a_traceback(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "Bengal_1.jpg").touch()
    workdir = tmp_path / "project"
    workdir.mkdir()
    done = run_index_stage(raw, workdir)
    assert done.returncode == 1
    assert done.stderr.startswith("error: stage index: data/raw/images: no usable image")
    assert "Traceback" not in done.stderr
    assert not (workdir / "data" / "index.csv").exists()


def test_real_subset_keeps_all_1029_files_and_labels_37_breeds(pet_subset: Path) -> None:
    result = index_images(pet_subset, IndexParams(label_regex=r"(.+)_\d+.jpg$", min_class_images=2, workers=0))
    assert len(result.table) == 1029 and result.excluded.empty
    assert len(result.vocab) == 37
    assert result.vocab[:12] == [
        "Abyssinian", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
        "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Siamese", "Sphynx",
    ]  # fmt: skip
    assert result.vocab[12:14] == ["american_bulldog", "american_pit_bull_terrier"]
    formats = result.table.set_index("path")["format"]
    assert formats["images/Abyssinian_34.jpg"] == "GIF"
    assert formats["images/Abyssinian_5.jpg"] == "PNG"
    assert result.metrics()["per_class"]["Abyssinian"] == 200
