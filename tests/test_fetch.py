"""fetch(): every source ends in the real archive's layout, atomically; bad local paths are clear errors."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from petbreeds.config import FetchParams, OxfordParams, load_params
from petbreeds.data.fetch import fetch
from petbreeds.errors import PetbreedsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> FetchParams:
    fetch_params = load_params(ROOT / "params.yaml").fetch
    small = fetch_params.sample.model_copy(update={"per_breed": 1, "min_side": 64, "max_side": 80})
    return fetch_params.model_copy(update={"sample": small})


def local(params: FetchParams, path: str | Path) -> FetchParams:
    return params.model_copy(update={"source": "local", "local_path": str(path)})


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sample_source(params: FetchParams, tmp_path: Path) -> None:
    fetch(params, tmp_path / "data" / "raw")
    assert len(names(tmp_path / "data" / "raw" / "images")) == 37
    assert names(tmp_path / "data" / "raw" / "annotations") == ["list.txt", "test.txt", "trainval.txt"]
    assert names(tmp_path / "data") == ["raw"]


def test_local_folder_arrives_complete(params: FetchParams, pet_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    fetch(local(params, pet_subset), out)
    assert names(out / "images") == names(pet_subset / "images") and len(names(out / "images")) == 1029
    for name in ("Abyssinian_34.jpg", "Abyssinian_5.jpg", "yorkshire_terrier_100.jpg"):  # the GIF, the PNG, a JPEG
        assert (out / "images" / name).read_bytes() == (pet_subset / "images" / name).read_bytes()
    assert names(out / "annotations") == ["list.txt", "test.txt", "trainval.txt"]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar", ".zip"])
def test_local_archive(params: FetchParams, pet_subset: Path, tmp_path: Path, suffix: str) -> None:
    """A fastai-cache-like archive (top folder oxford-iiit-pet/) of 40 real files."""
    chosen = sorted((pet_subset / "images").iterdir())[:40]
    archive = tmp_path / f"pets{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in chosen:
                zf.write(f, f"oxford-iiit-pet/images/{f.name}")
    else:
        with tarfile.open(archive, "w:gz" if suffix != ".tar" else "w") as tf:
            for f in chosen:
                tf.add(f, f"oxford-iiit-pet/images/{f.name}")
            tf.add(pet_subset / "annotations" / "list.txt", "oxford-iiit-pet/annotations/list.txt")
    out = tmp_path / "raw"
    fetch(local(params, archive), out)
    assert names(out / "images") == [f.name for f in chosen]
    assert (out / "images" / chosen[7].name).read_bytes() == chosen[7].read_bytes()
    assert (out / "annotations").exists() == (suffix != ".zip")
    assert names(tmp_path) == sorted([archive.name, "raw"])  # the extraction folder is gone


def test_local_path_expands_home(params: FetchParams, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data" / "oxford-iiit-pet" / "images").mkdir(parents=True)
    (tmp_path / "data" / "oxford-iiit-pet" / "images" / "pug_1.jpg").write_bytes(b"not decoded here")
    monkeypatch.setenv("HOME", str(tmp_path))
    fetch(local(params, "~/data"), tmp_path / "raw")
    assert names(tmp_path / "raw" / "images") == ["pug_1.jpg"]
    assert not (tmp_path / "raw" / "annotations").exists()


def test_local_path_errors(params: FetchParams, tmp_path: Path) -> None:
    with pytest.raises(PetbreedsError, match=r"fetch.local_path .*missing.* does not exist"):
        fetch(local(params, tmp_path / "missing"), tmp_path / "raw")
    (tmp_path / "empty_dataset" / "annotations").mkdir(parents=True)
    with pytest.raises(PetbreedsError, match=r"fetch.local_path .*empty_dataset.*: no files in it; point"):
        fetch(local(params, tmp_path / "empty_dataset"), tmp_path / "raw")
    (tmp_path / "notes.tar.gz").write_text("not an archive")
    with pytest.raises(PetbreedsError, match=r"notes.tar.gz: not a readable"):
        fetch(local(params, tmp_path / "notes.tar.gz"), tmp_path / "raw")
    official = tmp_path / "images.tar.gz"  # named like the official archive, but not it
    with tarfile.open(official, "w:gz") as tf:
        tf.addfile(tarfile.TarInfo("images/"), io.BytesIO())
    with pytest.raises(PetbreedsError, match=r"md5 .* official images.tar.gz has 5c4f3ee8"):
        fetch(local(params, official), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def _archive(path: Path, files: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_oxford_source_from_file_urls(params: FetchParams, tmp_path: Path) -> None:
    """The official archives' layout, served from file:// URLs: images, and only the lists of annotations."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    images_md5 = _archive(mirror / "images.tar.gz", {"images/Bengal_1.jpg": b"a", "images/pug_2.jpg": b"b"})
    annotations_md5 = _archive(
        mirror / "annotations.tar.gz",
        {"annotations/list.txt": b"#\n", "annotations/trimaps/pug_2.png": b"c", "annotations/xmls/pug_2.xml": b"d"},
    )
    oxford = OxfordParams(
        images_url=(mirror / "images.tar.gz").as_uri(),
        images_md5=images_md5,
        annotations_url=(mirror / "annotations.tar.gz").as_uri(),
        annotations_md5=annotations_md5,
    )
    out = tmp_path / "data" / "raw"
    fetch(params.model_copy(update={"source": "oxford-iiit-pet", "oxford_iiit_pet": oxford}), out)
    assert names(out) == ["annotations", "images"]
    assert names(out / "images") == ["Bengal_1.jpg", "pug_2.jpg"] and names(out / "annotations") == ["list.txt"]
    assert names(tmp_path / "data" / "downloads") == ["annotations.tar.gz", "images.tar.gz"]  # kept for reruns
    assert names(tmp_path / "data") == ["downloads", "raw"]


def test_stage_script_reports_errors_without_traceback(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(
        text.replace("source: sample", "source: local", 1).replace("local_path: ''", "local_path: /nonexistent/pets", 1)
    )
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "fetch.py")], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "error: stage fetch: fetch.local_path (/nonexistent/pets) does not exist" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_folder_of_your_own_is_copied_whole_into_images(params: FetchParams, tmp_path: Path) -> None:
    own = tmp_path / "mine"
    for rel in ("train/cat/a.jpg", "valid/dog/b.jpg", "labels.csv", ".DS_Store", "train/.hidden/c.jpg"):
        (own / rel).parent.mkdir(parents=True, exist_ok=True)
        (own / rel).write_bytes(b"x")
    fetch(local(params, own), tmp_path / "raw")
    found = sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert found == ["images/labels.csv", "images/train/cat/a.jpg", "images/valid/dog/b.jpg"]
    # an archive of it: its one top folder is the collection
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(own, arcname="mine")
    fetch(local(params, archive), tmp_path / "raw2")
    assert (tmp_path / "raw2" / "images" / "train" / "cat" / "a.jpg").is_file()


def test_a_csv_beside_images_travels_with_them(params: FetchParams, tmp_path: Path) -> None:
    (tmp_path / "kaggle" / "images").mkdir(parents=True)
    (tmp_path / "kaggle" / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "kaggle" / "labels.csv").write_text("file,label\nimages/a.jpg,cat\n")
    fetch(local(params, tmp_path / "kaggle"), tmp_path / "raw")
    assert (tmp_path / "raw" / "labels.csv").read_text() == "file,label\nimages/a.jpg,cat\n"
