"""The served model under load: the torch pyfunc and the ONNX model, each behind a real `mlflow models serve`, side by
side in one run; requests/s and p50/p95/p99 latency at 1, 4 and 16 concurrent clients, one base64 JPEG of a real pet
per request; the in-process rate as the ceiling; the size of each serving environment.

    .venv/bin/python bench/serve.py                      # sizes 128 (default run's) and 224 (the book's)
    .venv/bin/python bench/serve.py --sizes 128 --seconds 5 --data data/raw

The model: the default architecture (efficientnet_lite0) with its ImageNet body and a new head for 37 breeds, at
each size with the item size that goes with it (160 for 128, the book's 460 for 224). Its head is untrained: the
work per image does not depend on the weights' values. Both kinds are logged with the code the pipeline logs them
with (petbreeds.serve.mlflow_model.log_model) into a temporary store and served with one uvicorn worker
(MLFLOW_MODELS_WORKERS=1), one server at a time; the clients are threads of this process, on the same machine.

The environment's size: the installed size (files listed in each distribution's RECORD) of the closure of the logged
model's requirements.txt (what `mlflow models serve` without --env-manager local installs) over this venv's
distributions, as a fresh virtualenv would hold them.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from machine import ROOT, SHARED_SUBSET, header_text, machine_info, require_images, write_result
from mlflow.tracking import MlflowClient
from packaging.requirements import Requirement

from petbreeds.config import DataParams, load_params
from petbreeds.learn.checkpoint import save_checkpoint
from petbreeds.learn.model import body_of, create_model
from petbreeds.learn.pretrained import efficientnet_lite0_imagenet
from petbreeds.serve.export import export_onnx
from petbreeds.serve.mlflow_model import TORCH_MODEL, ServedModel, log_model
from petbreeds.serve.onnx_model import ONNX_MODEL, OnnxPredictor
from petbreeds.serve.predict import Predictor, image_files

MLFLOW = str(Path(sys.executable).with_name("mlflow"))
ITEM_SIZE = {128: 160, 224: 460}  # the default run's presizing, and the book's
CLIENTS = (1, 4, 16)
BREEDS = 37
CEILING_IMAGES = 64


def make_checkpoint(size: int, out: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", BREEDS, None)
    model.body = body_of("efficientnet_lite0", efficientnet_lite0_imagenet())
    data = DataParams(
        item_size=ITEM_SIZE[size], size=size, resize_method="crop", pad_mode="reflection", batch_size=64, num_workers=0
    )
    augment = load_params(ROOT / "params.yaml").augment  # the default run's (the served model never augments)
    vocab = [f"breed_{i}" for i in range(BREEDS)]
    save_checkpoint(out, model.eval(), arch="efficientnet_lite0", vocab=vocab, data=data, augment=augment)
    return out


def environment_mb(requirements: list[str]) -> float:
    """Installed MB of ``requirements`` and everything they require (markers evaluated here, no extras)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    total = 0
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this venv does not have: a fresh install would not either
        total += sum(f.size or 0 for f in dist.files or [])
        todo += [Requirement(r) for r in dist.requires or []]
    return total / 2**20


@contextmanager
def served(store: str, model_id: str, port: int, log: Path) -> Iterator[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_MODELS_WORKERS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    command = [MLFLOW, "models", "serve", "-m", f"models:/{model_id}", "--env-manager", "local"]
    with log.open("w") as out:
        server = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=out, stderr=out, start_new_session=True
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"error: the server stopped:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(f"{base}/ping", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"error: no answer on /ping in 300 s:\n{log.read_text()}") from None
                    time.sleep(1)
            yield base
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def request(base: str, body: bytes) -> float | None:
    """One request's latency in seconds; None for an error (an HTTP status other than 200, a timeout)."""
    start = time.perf_counter()
    req = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            response.read()
    except OSError:  # urllib's HTTPError and URLError, a timeout
        return None
    return time.perf_counter() - start


def load(base: str, bodies: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads sending requests back to back for ``seconds`` (each after one warm-up request)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    stop = [0.0]

    def client(k: int) -> None:
        request(base, bodies[k % len(bodies)])
        start_line.wait()
        i = k
        while time.perf_counter() < stop[0]:
            latency = request(base, bodies[i % len(bodies)])
            with lock:
                if latency is None:
                    errors[0] += 1
                else:
                    latencies.append(latency)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    stop[0] = time.perf_counter() + 3600
    start_line.wait()
    began = time.perf_counter()
    stop[0] = began + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    q = statistics.quantiles(latencies, n=100)
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * q[94],
        "p99_ms": 1000 * q[98],
    }


def ceiling(kind: str, model_file: Path, files: list[Path]) -> float:
    """Images/s in process: torch's Predictor in one batch of the images, the ONNX model one run per image (the
    images differ in size), after one warm-up pass."""
    predictor: Any = Predictor(model_file, torch.device("cpu")) if kind == "torch" else OnnxPredictor(model_file)
    predictor(files[:4])
    start = time.perf_counter()
    predictor(files)
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_SUBSET, help="a folder holding images/ (real pets)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224], choices=sorted(ITEM_SIZE))
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level (10)")
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    machine = machine_info()
    print(header_text(machine))
    files = image_files(require_images(args.data) / "images")[:CEILING_IMAGES]
    bodies = [
        json.dumps({"dataframe_records": [{"image": base64.b64encode(f.read_bytes()).decode()}]}).encode()
        for f in files
    ]
    kinds: dict[str, ServedModel] = {"torch": TORCH_MODEL, "onnx": ONNX_MODEL}
    environments: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        store = f"sqlite:///{tmp / 'mlflow.db'}"
        client = MlflowClient(tracking_uri=store)
        experiment_id = client.create_experiment("serve-bench", artifact_location=(tmp / "artifacts").as_uri())
        run_id = client.create_run(experiment_id).info.run_id
        for size in args.sizes:
            checkpoint = make_checkpoint(size, tmp / f"model{size}.pt")
            export_onnx(checkpoint, tmp / f"model{size}.onnx")
            model_files = {"torch": checkpoint, "onnx": tmp / f"model{size}.onnx"}
            for name, kind in kinds.items():
                model_id = log_model(
                    client, experiment_id, run_id, model_files[name], files[0], params={}, tags={}, kind=kind
                )
                logged = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
                environments[name] = environment_mb((logged / "requirements.txt").read_text().split())
                rate = ceiling(name, model_files[name], files)
                print(f"size {size} {name}: in process {rate:.1f} images/s")
                with served(store, model_id, args.port, tmp / f"serve-{name}-{size}.log") as base:
                    for clients in CLIENTS:
                        row = {"size": size, "model": name, "in_process_images_per_s": rate}
                        row |= load(base, bodies, clients, args.seconds)
                        rows.append(row)
                        print(
                            f"size {size} {name} {clients:>2} clients: {row['requests_per_s']:.1f} req/s, p50 "
                            f"{row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                            f"{row['errors']} errors"
                        )
    ratios = {
        f"{size}px_{clients}_clients": next(
            r["requests_per_s"] for r in rows if (r["size"], r["model"], r["clients"]) == (size, "onnx", clients)
        )
        / next(r["requests_per_s"] for r in rows if (r["size"], r["model"], r["clients"]) == (size, "torch", clients))
        for size in args.sizes
        for clients in CLIENTS
    }
    print("ONNX / torch req/s: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    print(f"environment: ONNX {environments['onnx']:.0f} MB / torch {environments['torch']:.0f} MB")
    record = {
        "data": {"path": str(args.data), "images": len(files)},
        "seconds_per_level": args.seconds,
        "workers": 1,
        "environment_mb": environments,
        "rows": rows,
        "onnx_over_torch": ratios,
    }
    write_result("serve", "efficientnet_lite0", record, machine)


if __name__ == "__main__":
    main()
