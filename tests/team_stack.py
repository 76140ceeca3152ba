"""The engines a team runs, started by the tests on 127.0.0.1, each on a free port in its own temporary folder:
PostgreSQL (Debian's ``postgresql`` package: a cluster of its own made with ``initdb``, run by ``pg_ctl`` as an
unprivileged user), an S3-compatible server (moto's server mode, from PyPI: S3 itself is outside our machines) and
``mlflow server`` on both, as docs/team.md § "A production server" runs it.

A support module, like tests/dvc_project.py: tests/test_mlflow_server.py and tests/test_team_remote.py share it.
Each class is a context manager that removes what it made; an engine that is not installed is a skip that says what
to install.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dvc_project import BIN, DVC, run

HOST = "127.0.0.1"
# Any key pair opens moto's S3; only the processes that talk to S3 get it (the MLflow server, DVC), never the MLflow
# clients: they reach the artifacts through the server.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "team-key", "AWS_SECRET_ACCESS_KEY": "team-secret", "AWS_DEFAULT_REGION": "us-east-1"}
DB_USER, DB_PASSWORD, DB_NAME = "mlflow", "mlflow-password", "mlflow"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait(what: str, ready: Any, process: subprocess.Popen[bytes], log: Path, seconds: float = 120) -> None:
    """Poll ``ready()`` until it is true; fail with ``log`` if ``process`` ends or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer in {seconds:.0f} s:\n{log.read_text()}")
        time.sleep(0.3)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Postgres:
    """A PostgreSQL cluster of its own in a temporary folder, on 127.0.0.1:``port``, with database ``mlflow`` owned
    by user ``mlflow`` (password authentication, as a server on another host would ask).

    PostgreSQL refuses to run as root: as root (CI, these machines) the cluster belongs to Debian's ``postgres``
    user, which the package creates, and every server command runs as it (``runuser``).
    """

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
        initdb = found[-1] if found else shutil.which("initdb")
        if initdb is None:
            pytest.skip("PostgreSQL is not installed: `apt-get install postgresql` (Debian; .ci/run does it)")
        self.bin = Path(initdb).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without `runuser` (util-linux): PostgreSQL cannot run as root")
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and no user `postgres` to run PostgreSQL (Debian's package makes it)")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.uri = f"postgresql://{DB_USER}:{DB_PASSWORD}@{HOST}:{self.port}/{DB_NAME}"

    def _run(self, *args: str) -> None:
        out = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"

    def __enter__(self) -> Postgres:
        # /tmp, not pytest's tmp_path: that one is private to the user running the tests (0700)
        self.folder = Path(tempfile.mkdtemp(prefix="petbreeds-pg-"))
        (self.folder / "password").write_text(DB_PASSWORD)
        if self.as_user:
            shutil.chown(self.folder, "postgres")
            shutil.chown(self.folder / "password", "postgres")
        data, log = self.folder / "data", self.folder / "server.log"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={self.folder / 'password'}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
        # TCP on 127.0.0.1 only; the unix socket in the cluster's folder, not /var/run/postgresql
        options = f"-h {HOST} -p {self.port} -k {self.folder}"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start")
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
        out = subprocess.run(
            [str(self.bin / "createdb"), "-h", HOST, "-p", str(self.port), "-U", DB_USER, DB_NAME],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder)


class S3Server:
    """moto's S3 server (``moto_server``) on 127.0.0.1:``port``; ``bucket(name)`` creates a bucket."""

    def __init__(self, folder: Path) -> None:
        if not (BIN / "moto_server").exists():
            pytest.skip("moto's S3 server is not installed: `pip install -e '.[dev,team]'`")
        self.folder, self.port = folder, free_port()
        self.endpoint = f"http://{HOST}:{self.port}"

    def __enter__(self) -> S3Server:
        log = self.folder / "s3.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", HOST, "-p", str(self.port)], stdout=out, stderr=subprocess.STDOUT
            )
        _wait("moto_server", lambda: _answers(f"{self.endpoint}/moto-api/"), self.process, log)
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.process)

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_KEYS["AWS_DEFAULT_REGION"],
        )

    def bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


def add_s3_remote(repo: Path, s3: S3Server, url: str) -> None:
    """docs/team.md § "A DVC remote" on S3-compatible storage: the remote and its endpoint in .dvc/config (committed
    by the caller), the credentials in .dvc/config.local (never committed)."""
    run(repo, DVC, "remote", "add", "-d", "storage", url)
    run(repo, DVC, "remote", "modify", "storage", "endpointurl", s3.endpoint)
    s3_credentials(repo)


def s3_credentials(repo: Path) -> None:
    """One clone's credentials for the team's S3 remote, as a teammate sets them: .dvc/config.local."""
    run(repo, DVC, "remote", "modify", "--local", "storage", "access_key_id", S3_KEYS["AWS_ACCESS_KEY_ID"])
    run(repo, DVC, "remote", "modify", "--local", "storage", "secret_access_key", S3_KEYS["AWS_SECRET_ACCESS_KEY"])


class MlflowServer:
    """docs/team.md's `mlflow server`: runs and registry in PostgreSQL, artifacts in S3 under ``artifacts`` (an
    ``s3://`` URI), proxied by the server; on 127.0.0.1:``port``, its log in ``folder``. Stopped and started again
    on the same port and stores, as a team's server that goes down and comes back."""

    def __init__(self, folder: Path, backend: str, artifacts: str, s3: S3Server) -> None:
        self.folder, self.backend, self.artifacts, self.s3 = folder, backend, artifacts, s3
        self.port = free_port()
        self.uri = f"http://{HOST}:{self.port}"
        self.log = folder / "mlflow-server.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
                "--artifacts-destination", self.artifacts, "--host", HOST, "--port", str(self.port),
                "--workers", "2"]  # fmt: skip
        # The server's own S3 credentials and endpoint: the clients have none
        env = {**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
        _wait("mlflow server", lambda: _answers(f"{self.uri}/health"), self.process, self.log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
