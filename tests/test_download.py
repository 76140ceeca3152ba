"""download() against a real HTTP server on 127.0.0.1, and safe_extract() against hostile archives."""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from petbreeds.data.download import download, safe_extract
from petbreeds.errors import PetbreedsError


@dataclass
class FileServer:
    """Serves ``files`` (path → bytes) with Range support; can cut the first response short."""

    files: dict[str, bytes] = field(default_factory=dict)
    cut_first_after: int | None = None  # bytes sent before the first response's connection is closed
    honour_range: bool = True
    requests: list[dict[str, str]] = field(default_factory=list)  # the headers of each request
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(server: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.requests.append(dict(self.headers))
            body = server.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start, status = 0, 200
            ranged = self.headers.get("Range")
            if ranged and server.honour_range:
                start, status = int(ranged.removeprefix("bytes=").split("-")[0]), 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(body) - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            payload = body[start:]
            if server.cut_first_after is not None and len(server.requests) == 1:
                payload = payload[: server.cut_first_after]
                self.close_connection = True
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

    return Handler


@pytest.fixture
def http_server() -> Iterator[FileServer]:
    server = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    httpd.shutdown()
    httpd.server_close()


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A real JPEG of seeded noise (noise, so that archives of a few are several KB, even gzipped)."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def pets_tar_gz(n: int = 6) -> bytes:
    """A .tar.gz in the official layout (images/<Breed>_<n>.jpg) of real JPEGs, each different."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for i in range(1, n + 1):
            data = jpeg_bytes(i, size=(64 + i, 48))
            info = tarfile.TarInfo(f"images/Bengal_{i}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_then_extract(http_server: FileServer, tmp_path: Path) -> None:
    archive = pets_tar_gz()
    http_server.files["/images.tar.gz"] = archive
    dest = tmp_path / "downloads" / "images.tar.gz"
    got = download(http_server.url("/images.tar.gz"), dest, md5=md5(archive), retries=0, timeout_s=5)
    assert got == dest and dest.read_bytes() == archive
    assert not dest.with_name("images.tar.gz.part").exists()
    safe_extract(dest, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [f"Bengal_{i}.jpg" for i in range(1, 7)]
    with Image.open(tmp_path / "out" / "images" / "Bengal_3.jpg") as im:
        assert im.size == (67, 48)

    # A second call finds the verified file and sends no request.
    download(http_server.url("/images.tar.gz"), dest, md5=md5(archive), retries=0, timeout_s=5)
    assert len(http_server.requests) == 1


def test_resume_after_cut_connection(http_server: FileServer, tmp_path: Path) -> None:
    archive = pets_tar_gz(12)
    cut = len(archive) // 3
    http_server.files["/images.tar.gz"] = archive
    http_server.cut_first_after = cut
    dest = tmp_path / "images.tar.gz"
    download(http_server.url("/images.tar.gz"), dest, md5=md5(archive), retries=2, timeout_s=5, backoff_s=0)
    assert len(http_server.requests) == 2
    assert "Range" not in http_server.requests[0]
    assert http_server.requests[1]["Range"] == f"bytes={cut}-"
    assert md5(dest.read_bytes()) == md5(archive)


def test_partial_download_is_kept_across_runs(http_server: FileServer, tmp_path: Path) -> None:
    archive = pets_tar_gz(12)
    http_server.files["/a.tar.gz"] = archive
    http_server.cut_first_after = 1000
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(PetbreedsError, match="download failed after 1 attempts.*resume"):
        download(http_server.url("/a.tar.gz"), dest, md5=md5(archive), retries=0, timeout_s=5)
    part = tmp_path / "a.tar.gz.part"
    assert part.stat().st_size == 1000 and not dest.exists()

    download(http_server.url("/a.tar.gz"), dest, md5=md5(archive), retries=0, timeout_s=5)
    assert http_server.requests[1]["Range"] == "bytes=1000-"
    assert dest.read_bytes() == archive and not part.exists()


def test_server_that_ignores_range_restarts_from_zero(http_server: FileServer, tmp_path: Path) -> None:
    archive = pets_tar_gz()
    http_server.files["/a.tar.gz"] = archive
    http_server.honour_range = False
    dest = tmp_path / "a.tar.gz"
    (tmp_path / "a.tar.gz.part").write_bytes(b"stale bytes from another file")
    download(http_server.url("/a.tar.gz"), dest, md5=md5(archive), retries=0, timeout_s=5)
    assert http_server.requests[0]["Range"] == "bytes=29-"
    assert dest.read_bytes() == archive


def test_checksum_mismatch_removes_the_partial(http_server: FileServer, tmp_path: Path) -> None:
    archive = pets_tar_gz()
    http_server.files["/a.tar.gz"] = archive
    url, wrong = http_server.url("/a.tar.gz"), "0" * 32
    with pytest.raises(PetbreedsError) as e:
        download(url, tmp_path / "a.tar.gz", md5=wrong, retries=0, timeout_s=5)
    assert url in str(e.value) and wrong in str(e.value) and md5(archive) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_fails_without_retrying(http_server: FileServer, tmp_path: Path) -> None:
    with pytest.raises(PetbreedsError, match="HTTP 404"):
        download(http_server.url("/nope.tar.gz"), tmp_path / "x.tar.gz", md5="0" * 32, retries=3, timeout_s=5)
    assert len(http_server.requests) == 1


def test_connection_refused_fails_fast_with_a_local_copy_hint(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/images.tar.gz"
    start = time.monotonic()
    with pytest.raises(PetbreedsError) as e:
        download(url, tmp_path / "images.tar.gz", md5="0" * 32, retries=5, timeout_s=5, backoff_s=10)
    # With the backoff above, a single retry would take 10 s: no retry happened.
    assert time.monotonic() - start < 9
    assert url in str(e.value) and "fetch.source: local" in str(e.value) and "fetch.local_path" in str(e.value)


# --------------------------------------------------------------------------------------------------
# safe_extract


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        ok = tarfile.TarInfo("images/ok.txt")
        tf.addfile(ok, io.BytesIO(b""))
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    return archive


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        (tarfile.TarInfo("../escaped.txt"), "../escaped.txt"),
        (tarfile.TarInfo("images/../../escaped.txt"), "images/../../escaped.txt"),
        (_symlink("images/link", "../../escaped.txt"), "images/link"),
        (_symlink("images/abs_link", "/etc/passwd"), "images/abs_link"),
    ],
)
def test_safe_extract_refuses_members_outside(tmp_path: Path, member: tarfile.TarInfo, expected: str) -> None:
    archive = _tar_with(tmp_path, member, b"pwned")
    dest = tmp_path / "a" / "b"
    with pytest.raises(PetbreedsError) as e:
        safe_extract(archive, dest)
    assert str(archive) in str(e.value) and repr(expected) in str(e.value)
    outside = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if dest not in p.parents)
    assert outside == ["a", "a/b", "evil.tar.gz"]


def test_safe_extract_refuses_absolute_names(tmp_path: Path) -> None:
    target = tmp_path / "absolute.txt"
    archive = _tar_with(tmp_path, tarfile.TarInfo(str(target)), b"pwned")
    with pytest.raises(PetbreedsError, match="absolute"):
        safe_extract(archive, tmp_path / "out")
    assert not target.exists() and not (tmp_path / "out" / target.relative_to("/")).exists()


def test_safe_extract_zip(tmp_path: Path) -> None:
    good, evil = tmp_path / "good.zip", tmp_path / "evil.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("pets/images/pug_1.jpg", jpeg_bytes(0))
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("images/pug_1.jpg", b"x")
        zf.writestr("../escaped.jpg", b"x")
    safe_extract(good, tmp_path / "good")
    assert (tmp_path / "good" / "pets" / "images" / "pug_1.jpg").read_bytes() == jpeg_bytes(0)
    with pytest.raises(PetbreedsError, match=r"evil\.zip.*'\.\./escaped\.jpg'"):
        safe_extract(evil, tmp_path / "evil")
    assert not (tmp_path / "escaped.jpg").exists() and not (tmp_path / "evil" / "images").exists()


def test_safe_extract_unreadable_archive(tmp_path: Path) -> None:
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(pets_tar_gz()[:200])
    with pytest.raises(PetbreedsError, match="broken.tar.gz: not a readable"):
        safe_extract(broken, tmp_path / "out")
