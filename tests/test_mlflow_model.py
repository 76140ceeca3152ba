"""The trained model as an MLflow model (petbreeds.serve.mlflow_model), registered (petbreeds.track.registry) and
served.

One pipeline result (the tiny model of tests/conftest.py, real breed JPEGs, params.yaml, dvc.lock) is logged once by
petbreeds.track.parent_run into a real sqlite store; the model is loaded in fresh processes and served by a real
`mlflow models serve` on a free localhost port.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from PIL import Image

from petbreeds import cli
from petbreeds.data.dataloaders import make_loader
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint
from petbreeds.learn.device import Compute
from petbreeds.learn.inference import get_preds
from petbreeds.serve.onnx_model import ONNX_MODEL, OnnxPredictor
from petbreeds.serve.predict import predict
from petbreeds.track import registry
from petbreeds.track.identity import RunIdentity
from petbreeds.track.parent_run import log_pipeline

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
BASELINE = "ab" + "c" * 38
DATA_MD5 = "0" * 32 + ".dir"
METRICS = {"error_rate": 0.0, "valid_loss": 0.05, "error_rate_tta": 0.0, "valid_loss_tta": 0.04}  # evaluate.json


def identity(name: str, exp: bool = True) -> RunIdentity:
    return RunIdentity(name=name, exp_name=name if exp else None, baseline_rev=BASELINE, git_commit=BASELINE)


def write_result(root: Path, model: Path | None, write_breed_images, onnx: Path | None = None) -> None:
    """A pipeline result as the stages leave it: params.yaml, dvc.lock, metrics, the split table and its images,
    ``model`` as models/model.pt and ``onnx`` as models/model.onnx (dvc.lock records each only then)."""
    table = write_breed_images(root / "data/raw/images", 1, 600)  # paths relative to data/raw
    table["split"] = ["train", "valid", "valid"]
    (root / "data/split.csv").write_text(table.to_csv(index=False))
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    stages = {"fetch": {"cmd": "python stages/fetch.py", "outs": [{"path": "data/raw", "md5": DATA_MD5}]}}
    if model is not None:
        (root / "models").mkdir()
        shutil.copy(model, root / "models/model.pt")
        md5 = hashlib.md5((root / "models/model.pt").read_bytes()).hexdigest()
        stages["train_unfrozen"] = {
            "cmd": "python stages/train.py unfrozen",
            "outs": [{"path": "models/model.pt", "md5": md5}],
        }
    if onnx is not None:
        shutil.copy(onnx, root / "models/model.onnx")
        md5 = hashlib.md5((root / "models/model.onnx").read_bytes()).hexdigest()
        stages["export"] = {"cmd": "python stages/export.py", "outs": [{"path": "models/model.onnx", "md5": md5}]}
    (root / "dvc.lock").write_text(json.dumps({"schema": "2.0", "stages": stages}))  # JSON is YAML
    (root / "metrics").mkdir()
    (root / "metrics/evaluate.json").write_text(json.dumps(METRICS))


@pytest.fixture(scope="module")
def project(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tiny_onnx: Path, write_breed_images
) -> Iterator[Path]:
    """The result's folder, with its own default store (``mlflow.db``): MLFLOW_TRACKING_URI unset, DVC_ROOT set."""
    root = tmp_path_factory.mktemp("mlflow_model") / "project"
    write_result(root, tiny_model, write_breed_images, tiny_onnx)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_RUN_ID"):
            mp.delenv(var, raising=False)
        mp.setenv("DVC_ROOT", str(root))
        yield root


@pytest.fixture(scope="module")
def store(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


@pytest.fixture(scope="module")
def run_id(project: Path) -> str:
    """The result logged by the mlflow_log stage's code."""
    return log_pipeline(project, identity("exp-a"), project)


@pytest.fixture(scope="module")
def model_id(store: MlflowClient, run_id: str) -> str:
    return registry.logged_model_id(store, store.get_run(run_id))


@pytest.fixture(scope="module")
def onnx_model_id(store: MlflowClient, run_id: str) -> str:
    return registry.logged_model_id(store, store.get_run(run_id), ONNX_MODEL.name)


@pytest.fixture(scope="module")
def champion(project: Path, model_id: str) -> int:
    """exp-a's model registered as ``petbreeds``, alias champion; its version."""
    return int(registry.register(project, "exp-a", "petbreeds", "champion").version)


def test_the_run_logs_its_model_with_metrics_signature_and_input_example(
    project: Path, store: MlflowClient, run_id: str, model_id: str, onnx_model_id: str
) -> None:
    model = store.get_logged_model(model_id)
    assert model.status == LoggedModelStatus.READY and model.name == "petbreeds"
    assert model.source_run_id == run_id and model.experiment_id == store.get_run(run_id).info.experiment_id
    assert model.tags["dvc.exp_name"] == "exp-a" and model.tags["git.commit"] == BASELINE
    assert model.tags["data.md5"] == DATA_MD5 and model.params["model.arch"] == "efficientnet_lite0"
    # the model's metrics: the evaluate stage's numbers (the TTA ones too), linked to it
    assert {m.key: m.value for m in model.metrics} == {f"evaluate/{k}": v for k, v in METRICS.items()}
    assert store.get_run(run_id).data.metrics["evaluate/error_rate"] == 0.0

    path = urlparse(model.artifact_location).path
    mlmodel = Model.load(path)
    assert mlmodel.signature.inputs.input_names() == ["image"]
    assert mlmodel.signature.params.params[0].name == "top_k"
    assert mlmodel.signature.outputs.input_names() == ["breed", "probability", "top_k"]
    # the input example: the first validation image of data/split.csv, base64 as a request carries it
    example = mlmodel.load_input_example(path)
    assert base64.b64decode(example["image"][0]) == (project / "data/raw/images/green_cat_600.jpg").read_bytes()
    requirements = (Path(path) / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "mlflow==3.17.2" in requirements
    assert (Path(path) / "code/petbreeds/serve/predict.py").is_file()  # the package travels with the model

    # nothing outside the petbreeds experiment: no fluent run, no model in MLflow's Default experiment
    experiments = [e.experiment_id for e in store.search_experiments()]
    assert [r.info.run_name for r in store.search_runs(experiments)] == ["exp-a"]
    assert {m.model_id for m in store.search_logged_models(experiment_ids=experiments)} == {model_id, onnx_model_id}


def test_logging_a_result_again_logs_no_second_model(project: Path, store: MlflowClient, run_id: str) -> None:
    assert log_pipeline(project, identity("exp-a"), project) == run_id
    experiment_id = store.get_run(run_id).info.experiment_id
    assert len(store.search_logged_models(experiment_ids=[experiment_id])) == 2  # the torch and the ONNX model


def test_an_interrupted_attempt_is_replaced_with_its_model(project: Path, store: MlflowClient) -> None:
    first = log_pipeline(project, identity("exp-interrupted"), project)
    old = store.get_run(first).outputs.model_outputs
    store.update_run(first, status="FAILED")  # as a stage killed while logging leaves it
    second = log_pipeline(project, identity("exp-interrupted"), project)
    assert second != first and len(store.get_run(second).outputs.model_outputs) == len(old) == 2
    for output in old:
        with pytest.raises(MlflowException, match="not found"):
            store.get_logged_model(output.model_id)


LOAD_AND_PREDICT = """
import base64, json, sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p) / "petbreeds").is_dir()]  # petbreeds only from the model itself
import mlflow, pandas as pd
from mlflow.exceptions import MlflowException
model = mlflow.pyfunc.load_model(sys.argv[1])
import petbreeds
image = Path(sys.argv[2])
frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode(), image.read_bytes()]})
out = {"package": petbreeds.__file__, "top3": model.predict(frame).to_dict("records")}
out["top1"] = model.predict(frame, params={"top_k": 1}).to_dict("records")
# a local caller that opts in at load time may name files
local = mlflow.pyfunc.load_model(sys.argv[1], model_config={"read_paths": True})
out["path"] = local.predict(pd.DataFrame({"image": [str(image)]})).to_dict("records")
few = mlflow.pyfunc.load_model(sys.argv[1], model_config={"max_images": 1})
out["errors"] = []
for m, bad in [(model, ["hello"]), (model, [base64.b64encode(b"hello").decode()]), (model, [str(image)]),
               (model, [str(image) + "_missing"]), (local, ["hello"]), (few, [image.read_bytes()] * 2)]:
    try:
        m.predict(pd.DataFrame({"image": bad}))
    except MlflowException as e:
        out["errors"].append([e.error_code, e.message])
print(json.dumps(out))
"""


def test_a_fresh_process_predicts_base64_and_bytes_as_petbreeds_predict_and_paths_only_when_asked(
    project: Path, tmp_path: Path, model_id: str, tiny_model: Path, write_breed_images
) -> None:
    write_breed_images(tmp_path / "new", 1, 700)
    image = tmp_path / "new/red_dog_700.jpg"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    args = [sys.executable, "-c", LOAD_AND_PREDICT, f"models:/{model_id}", str(image)]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert "/code/petbreeds/" in out["package"]  # the package the model carries, not this checkout's

    (expected,) = predict(image, tiny_model, top_k=3, device=torch.device("cpu"))
    assert expected.breed == "red_dog"
    for row in [*out["top3"], *out["path"]]:  # base64 text, bytes, a path opted in: one answer, petbreeds predict's
        assert row["breed"] == expected.breed and row["probability"] == pytest.approx(expected.probability, abs=1e-5)
        assert [t["breed"] for t in row["top_k"]] == [breed for breed, _ in expected.top_k]
        assert [t["probability"] for t in row["top_k"]] == pytest.approx([p for _, p in expected.top_k], abs=1e-5)
    assert [len(row["top_k"]) for row in out["top1"]] == [1, 1]

    codes, texts = zip(*out["errors"], strict=True)
    assert set(codes) == {"INVALID_PARAMETER_VALUE"}
    hello, hello_b64, path, missing, local_hello, too_many = texts
    assert hello == "image row 0: not base64; send each image file's bytes base64-encoded"
    assert hello_b64.startswith("image row 0: not an image Pillow can read"), hello_b64
    assert path == missing == hello  # a file that exists and one that does not: the same answer, nothing read
    assert local_hello.startswith("image row 0: neither base64 nor a file's path"), local_hello
    assert too_many.startswith("2 images in one request, more than max_images = 1; send fewer"), too_many


def test_register_names_aliases_and_tags_a_version(
    project: Path, store: MlflowClient, run_id: str, model_id: str, champion: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = store.get_model_version_by_alias("petbreeds", "champion")
    assert int(version.version) == champion == 1
    assert version.source == f"models:/{model_id}" and version.run_id == run_id
    assert version.tags == {"dvc.exp_name": "exp-a", "git.commit": BASELINE, "data.md5": DATA_MD5} | {
        "model.md5": store.get_run(run_id).data.tags["model.md5"]
    }

    # a run of plain `dvc repro`, found by its run name; no alias: only a new version. The store named by
    # MLFLOW_TRACKING_URI stays named (MLflow unsets it when it restores its fluent URI).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    repro_run = log_pipeline(project, identity("repro@1234567", exp=False), project)
    second = registry.register(project, "repro@1234567", "petbreeds", None)
    assert os.environ["MLFLOW_TRACKING_URI"] == store.tracking_uri
    assert int(second.version) == 2 and second.run_id == repro_run and "dvc.exp_name" not in second.tags
    assert int(store.get_model_version_by_alias("petbreeds", "champion").version) == 1


def test_register_says_what_to_run_when_the_run_or_its_model_is_missing(
    project: Path, tmp_path: Path, run_id: str, write_breed_images, capsys
) -> None:
    with pytest.raises(
        PetbreedsError, match=r"no MLflow run of the DVC experiment or run name 'nope'.*dvc exp run -n nope"
    ):
        registry.register(project, "nope", "petbreeds", "champion")

    write_result(tmp_path / "no-model", None, write_breed_images)  # a result whose dvc.lock records no model
    log_pipeline(tmp_path / "no-model", identity("exp-no-model"), project)
    with pytest.raises(PetbreedsError, match=r"run exp-no-model \(\w+\) has no logged model.*petbreeds mlflow-relog"):
        registry.register(project, "exp-no-model", "petbreeds", "champion")

    assert cli.main(["register", "nope", "--alias", "champion"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no MLflow run") and "Traceback" not in err


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def served(
    project: Path, folder: Path, port: int, model: str = "models:/petbreeds@champion", **env_vars: str
) -> Iterator[str]:
    """``model`` served by a real ``mlflow models serve`` on ``port`` (environment + ``env_vars``), answering
    /ping; yields its base URL, stops it (and its uvicorn child) afterwards. Its log is ``folder/serve.log``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **env_vars}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the server runs `uvicorn` from the venv
    command = [MLFLOW, "models", "serve", "-m", model, "--env-manager", "local"]
    log_path = folder / "serve.log"
    log = log_path.open("w")
    # its own process group: the server runs uvicorn as a child, and both must go
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port)], cwd=folder, env=env, stdout=log, stderr=log,
        start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no answer on /ping in 180 s:\n" + log_path.read_text()
            time.sleep(1)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def invoke(base: str, images: list[str]) -> tuple[int, dict]:
    records = [{"image": image} for image in images]
    return post(f"{base}/invocations", json.dumps({"dataframe_records": records}).encode())


def refused(base: str, images: list[str]) -> str:
    """The model's message of a 400 (no traceback) to a request of ``images``."""
    status, answer = invoke(base, images)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    assert "Traceback" not in json.dumps(answer) and "stack_trace" not in answer
    # MLflow's scoring server puts the client's own input before the model's message: keep the model's
    return answer["message"].split("\nError: ", 1)[-1]


@pytest.mark.slow
def test_the_served_champion_names_the_breed_of_a_jpeg_reads_no_server_file_and_bounds_a_request(
    project: Path, tmp_path: Path, champion: int, free_port, write_breed_images, tiny_model: Path
) -> None:
    with served(project, tmp_path, free_port()) as base:
        write_breed_images(tmp_path / "new", 1, 800)
        jpeg = base64.b64encode((tmp_path / "new/blue_dog_800.jpg").read_bytes()).decode()
        status, answer = invoke(base, [jpeg])
        assert status == 200, answer
        (prediction,) = answer["predictions"]
        assert prediction["breed"] == "blue_dog" and prediction["probability"] > 0.5
        # one JPEG, one path: the server's probabilities are petbreeds predict's and the evaluate stage's (its
        # loader, the checkpoint's valid augmentation, get_preds)
        (expected,) = predict(tmp_path / "new/blue_dog_800.jpg", tiny_model, top_k=3, device=torch.device("cpu"))
        assert prediction["probability"] == pytest.approx(expected.probability, abs=1e-5)
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(
            [p for _, p in expected.top_k], abs=1e-5
        )
        cpu = torch.device("cpu")
        model, ckpt = load_checkpoint(tiny_model, cpu)
        table = pd.DataFrame({"path": ["blue_dog_800.jpg"], "label": ["blue_dog"]})
        loader = make_loader(table, tmp_path / "new", ckpt.vocab, ckpt.data_params(batch_size=1), train=False, seed=0)
        logits, _ = get_preds(model, loader, ckpt.valid_augment(cpu), Compute(cpu, None, channels_last=False))
        evaluated = logits.softmax(dim=1)[0].sort(descending=True).values[:3].tolist()
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(evaluated, abs=1e-5)

        jpeg_bytes = (tmp_path / "new/blue_dog_800.jpg").read_bytes()
        assert refused(base, [base64.b64encode(b"hello").decode()]).startswith(
            "image row 0: not an image Pillow can read"
        )
        assert refused(base, [base64.b64encode(jpeg_bytes[: len(jpeg_bytes) // 2]).decode()]).startswith(
            "image row 0: not an image Pillow can read"
        )  # a truncated JPEG
        assert "not an image Pillow can read" in refused(base, [base64.b64encode(os.urandom(4096)).decode()])

        # Paths on the server: a readable JPEG (its access time set in the past, so that a read would move it under
        # Linux's relatime), a text file, a missing file, the server's hostname file: one answer, nothing read.
        sentinel = tmp_path / "server_side.jpg"
        sentinel.write_bytes(jpeg_bytes)
        os.utime(sentinel, (1_000_000_000, time.time()))
        (tmp_path / "notes.txt").write_text("not an image")
        answers = {refused(base, [str(p)]) for p in (sentinel, tmp_path / "notes.txt", tmp_path / "missing.jpg")}
        answers.add(refused(base, ["/etc/hostname"]))
        assert answers == {"image row 0: not base64; send each image file's bytes base64-encoded"}
        control = tmp_path / "control.jpg"  # the same, read by this test: does this filesystem record reads?
        control.write_bytes(jpeg_bytes)
        os.utime(control, (1_000_000_000, time.time()))
        control.read_bytes()
        if control.stat().st_atime != 1_000_000_000:  # it does (not mounted noatime): the server read nothing
            assert sentinel.stat().st_atime == 1_000_000_000

        # What a request may cost: 33 images (one over max_images), a 12,000 x 12,000 PNG of a few hundred KB
        too_many = refused(base, [jpeg] * 33)
        assert too_many.startswith("33 images in one request, more than max_images = 32"), too_many
        assert "SERVING_MODEL_CONFIG" in too_many
        bomb = io.BytesIO()
        Image.new("RGB", (12_000, 12_000), (90, 120, 200)).save(bomb, format="PNG")
        message = refused(base, [jpeg, base64.b64encode(bomb.getvalue()).decode()])
        assert message.startswith("image row 1: 12000 x 12000 = 144,000,000 pixels, more than max_pixels = 50,000,000")
        status, answer = invoke(base, [jpeg])  # and the server goes on answering
        assert status == 200 and answer["predictions"][0]["breed"] == "blue_dog", answer


@pytest.mark.slow
def test_the_scoring_servers_environment_sets_the_limits(
    project: Path, tmp_path: Path, champion: int, free_port, write_breed_images
) -> None:
    write_breed_images(tmp_path / "new", 1, 900)
    jpeg = base64.b64encode((tmp_path / "new/green_cat_900.jpg").read_bytes()).decode()
    with served(project, tmp_path, free_port(), SERVING_MODEL_CONFIG=json.dumps({"max_images": 1})) as base:
        message = refused(base, [jpeg, jpeg])
        assert message.startswith("2 images in one request, more than max_images = 1"), message
        status, answer = invoke(base, [jpeg])
        assert status == 200 and answer["predictions"][0]["breed"] == "green_cat", answer


def test_the_pyfunc_predicts_with_tta_when_asked_and_bounds_it(tiny_model: Path, write_breed_images, tmp_path) -> None:
    """In process: the param ``tta`` is ``petbreeds predict --tta``'s; more passes than ``max_tta`` are refused."""
    from mlflow.pyfunc import PythonModelContext

    from petbreeds.serve.mlflow_model import CHECKPOINT, BreedClassifier

    def loaded(config: dict[str, int] | None) -> BreedClassifier:
        model = BreedClassifier()
        model.load_context(PythonModelContext(artifacts={CHECKPOINT: str(tiny_model)}, model_config=config))
        return model

    write_breed_images(tmp_path / "new", 1, 700)
    image = tmp_path / "new/red_dog_700.jpg"
    frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()]})
    model = loaded(None)
    (row,) = model.predict(None, frame, params={"tta": 4}).to_dict("records")
    (expected,) = predict(image, tiny_model, top_k=3, device=torch.device("cpu"), tta=4)
    assert [t["probability"] for t in row["top_k"]] == pytest.approx([p for _, p in expected.top_k], abs=1e-6)
    (plain,) = model.predict(None, frame).to_dict("records")  # tta 0 unless asked
    assert plain["probability"] != pytest.approx(row["probability"], abs=1e-4)
    with pytest.raises(MlflowException, match=r"tta = 17: .* between 0 and max_tta = 16; ask for fewer") as e:
        model.predict(None, frame, params={"tta": 17})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match=r"max_tta = 1;"):
        loaded({"max_tta": 1}).predict(None, frame, params={"tta": 2})
    with pytest.raises(MlflowException, match=r"tta = -1: "):
        model.predict(None, frame, params={"tta": -1})


def test_the_onnx_model_is_logged_beside_with_an_environment_without_torch(
    store: MlflowClient, run_id: str, onnx_model_id: str
) -> None:
    model = store.get_logged_model(onnx_model_id)
    assert model.status == LoggedModelStatus.READY and model.name == "petbreeds-onnx"
    assert model.source_run_id == run_id and model.tags["dvc.exp_name"] == "exp-a"
    path = Path(urlparse(model.artifact_location).path)
    requirements = {line.split("==")[0] for line in (path / "requirements.txt").read_text().split()}
    assert requirements == {"mlflow-skinny", "onnxruntime", "numpy", "pillow", "pandas"}
    assert Model.load(str(path)).signature.inputs.input_names() == ["image"]


# Where the served ONNX model runs, torch cannot be imported: every Python process of the server (mlflow, uvicorn,
# its workers) loads this sitecustomize first, which blocks torch and leaves its pid as proof that it ran.
NO_TORCH_SITE = """import os, sys
sys.modules["torch"] = None
open(os.path.join(os.path.dirname(__file__), f"loaded.{os.getpid()}"), "w").close()
"""


@pytest.mark.slow
def test_the_onnx_model_is_served_without_torch_by_the_same_rules(
    project: Path, tmp_path: Path, onnx_model_id: str, tiny_onnx: Path, free_port, write_breed_images
) -> None:
    registry.register(project, "exp-a", "petbreeds-onnx", "champion", ONNX_MODEL.name)
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH_SITE)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    write_breed_images(tmp_path / "new", 1, 810)
    image = tmp_path / "new/blue_dog_810.jpg"
    jpeg = base64.b64encode(image.read_bytes()).decode()
    with served(project, tmp_path, free_port(), "models:/petbreeds-onnx@champion", PYTHONPATH=pythonpath) as base:
        status, answer = invoke(base, [jpeg, jpeg])
        assert status == 200, answer
        (expected,) = OnnxPredictor(tiny_onnx)([image])
        for prediction in answer["predictions"]:
            assert prediction["breed"] == "blue_dog" == expected.breed
            assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(
                [p for _, p in expected.top_k], abs=1e-6
            )
        # the torch pyfunc's refusals, word for word
        assert refused(base, [base64.b64encode(b"hello").decode()]).startswith(
            "image row 0: not an image Pillow can read (no image format recognised)"
        )
        assert refused(base, [str(image)]) == "image row 0: not base64; send each image file's bytes base64-encoded"
        assert refused(base, [jpeg] * 33).startswith("33 images in one request, more than max_images = 32")
        bomb = io.BytesIO()
        Image.new("RGB", (12_000, 12_000), (90, 120, 200)).save(bomb, format="PNG")
        message = refused(base, [jpeg, base64.b64encode(bomb.getvalue()).decode()])
        assert message.startswith("image row 1: 12000 x 12000 = 144,000,000 pixels, more than max_pixels = 50,000,000")
        status, answer = invoke(base, [jpeg])
        assert status == 200 and answer["predictions"][0]["breed"] == "blue_dog", answer
    assert len(list(site.glob("loaded.*"))) >= 2  # the server and its worker ran with torch blocked


def test_the_onnx_pyfunc_refuses_tta_instead_of_ignoring_it(tiny_onnx: Path, write_breed_images, tmp_path) -> None:
    """The ONNX model shares the torch pyfunc's signature, param tta included; it has no augmented passes."""
    from mlflow.pyfunc import PythonModelContext

    from petbreeds.serve.onnx_model import ONNX_ARTIFACT, OnnxBreedClassifier

    model = OnnxBreedClassifier()
    model.load_context(PythonModelContext(artifacts={ONNX_ARTIFACT: str(tiny_onnx)}, model_config=None))
    write_breed_images(tmp_path / "new", 1, 720)
    frame = pd.DataFrame({"image": [base64.b64encode((tmp_path / "new/green_cat_720.jpg").read_bytes()).decode()]})
    assert model.predict(None, frame, params={"tta": 0}).loc[0, "breed"] == "green_cat"
    with pytest.raises(MlflowException, match=r"tta: the ONNX model has no test-time augmentation") as e:
        model.predict(None, frame, params={"tta": 2})
    assert e.value.error_code == "INVALID_PARAMETER_VALUE"
