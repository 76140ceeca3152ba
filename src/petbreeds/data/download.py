"""HTTP downloads that survive bad networks, and archive extraction that cannot escape its folder.

``download`` writes into ``<dest>.part`` and keeps it between runs: the next attempt (or the next
``dvc repro``) asks the server for the rest with an HTTP Range header. Only a file whose md5 matches
becomes ``dest``. An unreachable host (refused, DNS, no route) fails at once: retrying cannot help.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError

CHUNK = 1 << 20
LOCAL_COPY_HINT = (
    "to use a copy you already have, set fetch.source: local and fetch.local_path to the archive or to the "
    "folder holding images/ (e.g. dvc exp run -S fetch.source=local -S fetch.local_path=~/.fastai/data/oxford-iiit-pet)"
)
# OS errors that mean "this host cannot be reached from here"
_UNREACHABLE = (errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL)


class _Interrupted(Exception):
    """A transfer that stopped early for a reason worth retrying."""


def _unreachable(reason: object) -> bool:
    return isinstance(reason, socket.gaierror) or (isinstance(reason, OSError) and reason.errno in _UNREACHABLE)


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    """Append the rest of ``url`` to ``part`` (start over when the server ignores Range); one request."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to send: the part is complete (the md5 decides) or longer than the file
            return
        if e.code >= 500 or e.code == 429:
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise PetbreedsError(
            f"{url}: HTTP {e.code} {e.reason}; check the URL in params.yaml, or {LOCAL_COPY_HINT}"
        ) from None
    with response:
        resumed = offset > 0 and getattr(response, "status", 200) == 206
        if not resumed:
            offset = 0  # the server sent the whole file (it ignored Range, or we asked for all of it)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, "ab" if resumed else "wb") as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.stem,
                leave=False,
                disable=None,  # tqdm's rule: a bar on a terminal only, not redraws in DVC's and the queue's logs
            ) as bar,
        ):
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received < total:  # http.client returns a short body without raising
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def download(url: str, dest: Path, *, md5: str, retries: int, timeout_s: float, backoff_s: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` and check its md5; a ``dest`` already there with the right md5 is kept.

    Up to ``retries`` more attempts follow a failed one, ``backoff_s`` · 1, 2, 4 … seconds apart, each
    resuming from what ``dest.part`` already holds. Raises :class:`PetbreedsError` when the host is
    unreachable (at once), when attempts run out (the ``.part`` is kept for the next run), or when
    the md5 differs (the ``.part`` is removed).
    """
    dest = Path(dest)
    if dest.exists():
        if file_digest(dest, "md5") == md5:
            return dest
        dest.unlink()  # stale or corrupt: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        except urllib.error.URLError as e:
            if _unreachable(e.reason):
                raise PetbreedsError(f"cannot reach {url} ({e.reason}); {LOCAL_COPY_HINT}") from None
            problem = str(e.reason)
        except (_Interrupted, http.client.HTTPException, OSError) as e:  # OSError covers timeouts and resets
            if _unreachable(e):
                raise PetbreedsError(f"cannot reach {url} ({e}); {LOCAL_COPY_HINT}") from None
            problem = str(e) or type(e).__name__
        if attempt == retries:
            raise PetbreedsError(
                f"{url}: download failed after {retries + 1} attempts ({problem}); run again to resume from "
                f"{part} (fetch.retries, fetch.timeout_s set the patience), or {LOCAL_COPY_HINT}"
            )
        delay = backoff_s * 2**attempt
        print(f"{url}: {problem}; retrying in {delay:g} s", flush=True)
        time.sleep(delay)
    actual = file_digest(part, "md5")
    if actual != md5:
        part.unlink()
        raise PetbreedsError(
            f"{url}: md5 mismatch, expected {md5}, got {actual}; the partial download was removed. Run again to "
            "download afresh; if it persists the file changed upstream: check the md5 in params.yaml"
        )
    os.replace(part, dest)
    return dest


def _refuse_absolute(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's "data" filter, and absolute names refused rather than quietly made relative."""
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) or zip archive into ``dest``, refusing anything that would land outside.

    Tar uses the stdlib's ``filter="data"`` (no ``..``, no links out of ``dest``, no device files) and
    also refuses absolute names. Raises :class:`PetbreedsError` naming the archive and the member.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise PetbreedsError(
                        f"{archive}: unsafe member {name!r} (a path outside the folder); nothing extracted"
                    )
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter=_refuse_absolute)
    except tarfile.FilterError as e:
        raise PetbreedsError(
            f"{archive}: unsafe member {e.tarinfo.name!r} ({e}); refusing to extract it. Is this the archive you meant?"
        ) from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise PetbreedsError(
            f"{archive}: not a readable tar or zip archive ({e}); replace it and fetch again"
        ) from None
