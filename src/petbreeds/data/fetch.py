"""``fetch.source`` → ``data/raw``: the generated sample, the official archives, or a local copy.

Whatever the source, ``out_dir`` ends up in the real archive's layout — ``images/`` and, when the
source has them, the official lists ``annotations/*.txt`` and CSV files beside ``images/`` — and is replaced as a
whole, atomically. Of the annotations only the lists are kept: the trimaps and XML boxes are not used, and their PNGs
would otherwise sit among the images the index stage searches.

A local folder (or archive) of your own images that has no ``images/`` folder is copied whole into ``images/``:
class folders, ``train/`` and ``valid/`` trees and a labels CSV keep their places (docs/data.md § "Your own images").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path, PurePosixPath

from petbreeds.atomic import atomic_directory
from petbreeds.config import FetchParams
from petbreeds.data.download import download, safe_extract
from petbreeds.data.sample_data import generate_sample
from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError


def fetch(params: FetchParams, out_dir: str | os.PathLike[str], downloads_dir: Path | None = None) -> None:
    """Fill ``out_dir`` from ``params.source``.

    Downloads are kept in ``downloads_dir`` (default: ``downloads/`` beside ``out_dir``, so
    ``data/downloads`` for ``data/raw``), outside the DVC output: an interrupted download resumes,
    and a finished one is not fetched again while its md5 matches.
    """
    out_dir = Path(out_dir)
    if params.source == "sample":
        generate_sample(out_dir, params.sample)
    elif params.source == "oxford-iiit-pet":
        _fetch_oxford(params, out_dir, downloads_dir or out_dir.parent / "downloads")
    else:
        _fetch_local(params, Path(params.local_path).expanduser(), out_dir)


def _file_name(url: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(url).path).name


def _fetch_oxford(params: FetchParams, out_dir: Path, downloads_dir: Path) -> None:
    pet = params.oxford_iiit_pet
    archives = [
        download(url, downloads_dir / _file_name(url), md5=md5, retries=params.retries, timeout_s=params.timeout_s)
        for url, md5 in ((pet.images_url, pet.images_md5), (pet.annotations_url, pet.annotations_md5))
    ]
    _install_archives(archives, out_dir, what=" and ".join(str(a) for a in archives))


def _fetch_local(params: FetchParams, path: Path, out_dir: Path) -> None:
    what = f"fetch.local_path ({path})"
    if not path.exists():
        raise PetbreedsError(
            f"{what} does not exist; set it to an archive (.tgz, .tar.gz, .tar, .zip) or to a folder: of your own "
            "images, or holding images/ (e.g. ~/.fastai/data/oxford-iiit-pet)"
        )
    if path.is_dir():
        root = _dataset_root(path, what)
        if root is None:
            _install_whole(path, out_dir, what, move=False)
        else:
            _install(root, out_dir, move=False)
        return
    # A copy of an official archive is checked against the md5 in params, as a download would be.
    pet = params.oxford_iiit_pet
    expected = {_file_name(pet.images_url): pet.images_md5, _file_name(pet.annotations_url): pet.annotations_md5}
    if path.name in expected and (actual := file_digest(path, "md5")) != expected[path.name]:
        raise PetbreedsError(
            f"{what}: md5 {actual}, but the official {path.name} has {expected[path.name]}; the copy is "
            "incomplete or corrupt: replace it, or rename it if it is another archive"
        )
    _install_archives([path], out_dir, what)


def _install_archives(archives: list[Path], out_dir: Path, what: str) -> None:
    """Extract into a temporary folder beside ``out_dir`` (same filesystem: moving is a rename), then install."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.extract.", dir=out_dir.parent) as staging:
        for archive in archives:
            safe_extract(archive, Path(staging))
        root = _dataset_root(Path(staging), what)
        if root is None:
            _install_whole(_single_folder(Path(staging)), out_dir, what, move=True)
        else:
            _install(root, out_dir, move=True)


def _dataset_root(path: Path, what: str) -> Path | None:
    """The folder holding ``images/``: ``path`` itself or up to two levels below (an archive's top folder,
    fastai's ``~/.fastai/data`` holding ``oxford-iiit-pet/``); None when there is none (a folder of your own)."""
    levels = [[path], sorted(path.glob("*/")), sorted(path.glob("*/*/"))]
    for candidates in levels:
        roots = [c for c in candidates if (c / "images").is_dir()]
        if len(roots) > 1:
            names = ", ".join(str(r.relative_to(path)) for r in roots)
            raise PetbreedsError(f"{what}: several folders hold images/ ({names}); point fetch.local_path at one")
        if roots:
            if not any((roots[0] / "images").iterdir()):
                raise PetbreedsError(f"{what}: {roots[0] / 'images'} is empty")
            return roots[0]
    return None


def _single_folder(path: Path) -> Path:
    """An extracted archive's content: its one top folder when it has nothing else (``mydata.zip`` → ``mydata/``)."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    return _single_folder(entries[0]) if len(entries) == 1 and entries[0].is_dir() else path


def _install_whole(root: Path, out_dir: Path, what: str, *, move: bool) -> None:
    """A folder of your own images, whatever its layout, as ``out_dir/images`` (hidden files left out)."""
    if not any(p.is_file() for p in root.rglob("*") if not p.name.startswith(".")):
        raise PetbreedsError(
            f"{what}: no files in it; point fetch.local_path at a folder of images (one folder per class, train/ "
            "and valid/ folders, or images and a labels CSV), a folder holding images/, or an archive of one"
        )
    with atomic_directory(out_dir) as tmp:
        if move:
            os.replace(root, tmp / "images")
        else:
            shutil.copytree(root, tmp / "images", ignore=shutil.ignore_patterns(".*"))


def _install(root: Path, out_dir: Path, *, move: bool) -> None:
    """``root/images``, ``root/annotations/*.txt`` and ``root/*.csv`` into ``out_dir``, atomically; moved when ``root``
    is ours."""
    lists = sorted((root / "annotations").glob("*.txt"))
    tables = sorted(root.glob("*.csv"))  # a labels CSV beside images/ (index.labels_csv)
    with atomic_directory(out_dir) as tmp:
        for f in tables:
            shutil.copy2(f, tmp / f.name)
        if move:
            os.replace(root / "images", tmp / "images")
        else:
            shutil.copytree(root / "images", tmp / "images")
        if lists:
            (tmp / "annotations").mkdir()
            for f in lists:
                shutil.copy2(f, tmp / "annotations" / f.name)
