"""The exported ONNX model (petbreeds.serve.export) against `petbreeds predict`: the tiny trained model of
tests/conftest.py exported once through `petbreeds export`, run by onnxruntime alone (petbreeds.serve.onnx_model),
over generated images always and the real subset when it is present; and the docs' torch-free client. The ONNX model
logged with the run and served without torch: tests/test_mlflow_model.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from ruamel.yaml import YAML

from petbreeds.data.sample_data import BREEDS as SAMPLE_BREEDS
from petbreeds.data.sample_data import SampleParams, render
from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import load_checkpoint, save_checkpoint
from petbreeds.serve.export import export_onnx
from petbreeds.serve.onnx_model import OnnxPredictor
from petbreeds.serve.predict import Predictor, image_files

ROOT = Path(__file__).resolve().parents[1]
# The agreement asked of the ONNX model: top-1 identical on this share of images, every probability this close, and
# each top-1 disagreement a near-tie (torch's two best within NEAR_TIE).
TOP1_SHARE, PROB_TOLERANCE, NEAR_TIE = 0.995, 0.01, 2 * 0.01


@pytest.fixture(scope="module")
def exported(tiny_onnx: Path) -> Path:
    """The tiny model exported by ``petbreeds export`` (tests/conftest.py)."""
    return tiny_onnx


def agreement(model_pt: Path, model_onnx: Path, files: list[Path]) -> list[str]:
    """Every image through torch's `petbreeds predict` path and the ONNX model; asserts the agreement targets and
    returns the top-1 disagreements (each a near-tie), described."""
    torch_preds = Predictor(model_pt, torch.device("cpu"))(files, top_k=1000)
    onnx_preds = OnnxPredictor(model_onnx)(files, top_k=1000)
    vocab = sorted(dict(torch_preds[0].top_k))
    table = [np.array([[dict(p.top_k)[b] for b in vocab] for p in preds]) for preds in (torch_preds, onnx_preds)]
    by_torch, by_onnx = table
    worst = np.abs(by_torch - by_onnx).max(axis=1)
    assert worst.max() <= PROB_TOLERANCE, f"{files[int(worst.argmax())]}: probabilities differ by {worst.max():.4f}"
    differ = np.flatnonzero(by_torch.argmax(1) != by_onnx.argmax(1))
    assert 1 - len(differ) / len(files) >= TOP1_SHARE, f"{len(differ)} of {len(files)} top-1 disagree"
    described = []
    for i in differ:
        first, second = np.sort(by_torch[i])[::-1][:2]
        assert first - second <= NEAR_TIE, f"{files[i]}: torch {first:.4f} vs {second:.4f} is no near-tie"
        described.append(f"{files[i].name}: {torch_preds[i].breed} vs {onnx_preds[i].breed}, {first:.4f}/{second:.4f}")
    return described


def test_the_file_keeps_the_contract_and_names_its_source(exported: Path, tiny_model: Path, breeds) -> None:
    session = ort.InferenceSession(str(exported))
    (image,), (probs,) = session.get_inputs(), session.get_outputs()
    assert (image.name, image.type, image.shape[1:]) == ("image", "tensor(uint8)", ["H", "W", 3])
    assert (probs.name, probs.type, probs.shape[1]) == ("probabilities", "tensor(float)", len(breeds))
    meta = session.get_modelmeta().custom_metadata_map
    _, ckpt = load_checkpoint(tiny_model, torch.device("cpu"))
    assert json.loads(meta["vocab"]) == breeds
    assert (int(meta["item_size"]), int(meta["size"]), meta["resize_method"]) == (ckpt.item_size, ckpt.size, "crop")
    assert meta["source_md5"] == file_digest(tiny_model, "md5") and meta["format"] == "petbreeds-onnx/1"
    # any H, W, and a batch of images of one size
    for shape in [(2, 37, 53, 3), (1, 400, 90, 3), (3, 40, 40, 3)]:
        out = session.run(None, {"image": np.zeros(shape, np.uint8)})[0]
        assert out.shape == (shape[0], len(breeds)) and np.allclose(out.sum(1), 1, atol=1e-5)


def test_agrees_with_predict_on_generated_images(exported: Path, tiny_model: Path, tmp_path: Path, write_breed_images):
    """The colour breeds the model knows, and the generated sample's drawn pets at photo sizes."""
    write_breed_images(tmp_path / "colours", 4, 700)
    params = SampleParams(per_breed=1, seed=0, min_side=120, max_side=500)
    (tmp_path / "sample").mkdir()
    for n, name in enumerate(SAMPLE_BREEDS):
        render(name, n, params).save(tmp_path / "sample" / f"{name}_{n}.jpg", quality=90)
    assert agreement(tiny_model, exported, image_files(tmp_path)) == []


def test_agrees_with_predict_on_the_real_subset(exported: Path, tiny_model: Path, pet_subset: Path) -> None:
    files = image_files(pet_subset / "images")
    assert len(files) == 1029
    disagreements = agreement(tiny_model, exported, files)
    print(f"{len(disagreements)} top-1 disagreements of {len(files)}, all near-ties:", *disagreements, sep="\n")


def test_resize_method_pad_is_refused_with_what_to_do(tiny_model: Path, tmp_path: Path) -> None:
    model, ckpt = load_checkpoint(tiny_model, torch.device("cpu"))
    padded = tmp_path / "pad.pt"
    data = ckpt.data_params(8).model_copy(update={"resize_method": "pad"})
    save_checkpoint(padded, model, arch=ckpt.arch, vocab=ckpt.vocab, data=data, augment=ckpt.augment)
    with pytest.raises(PetbreedsError, match="resize_method is 'pad'.*crop"):
        export_onnx(padded, tmp_path / "pad.onnx")
    assert not (tmp_path / "pad.onnx").exists()


# The client of docs/evaluate-and-serve.md, run where torch cannot be imported (a None in sys.modules makes
# `import torch` raise ImportError), with the docs' file names.
NO_TORCH = "import sys; sys.modules['torch'] = None; exec(open('client.py').read())"


def docs_client() -> str:
    text = (ROOT / "docs" / "evaluate-and-serve.md").read_text()
    match = re.search(r"<!-- torch-free client -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/evaluate-and-serve.md: no ```python block after <!-- torch-free client -->"
    return match.group(1)


def test_the_docs_client_classifies_a_jpeg_without_torch(exported: Path, tmp_path: Path, write_breed_images):
    code = docs_client()
    assert len(code.strip().splitlines()) <= 12 and "import petbreeds" not in code and "from petbreeds" not in code
    write_breed_images(tmp_path / "new", 1, 900)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.onnx").write_bytes(exported.read_bytes())
    (tmp_path / "photo.jpg").write_bytes((tmp_path / "new" / "red_dog_900.jpg").read_bytes())
    (tmp_path / "client.py").write_text(code)
    out = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[0] == "red_dog", out.stdout
    blocked = subprocess.run(
        [sys.executable, "-c", NO_TORCH.replace("exec(open('client.py').read())", "import torch")], capture_output=True
    )
    assert blocked.returncode != 0  # the block holds


@pytest.mark.slow
def test_the_pipeline_exports_its_model(finished: Path) -> None:
    session = ort.InferenceSession(str(finished / "models/model.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["source_md5"] == file_digest(finished / "models/model.pt", "md5")
    lock = YAML(typ="safe").load((finished / "dvc.lock").read_text())
    assert "models/model.onnx" in [out["path"] for out in lock["stages"]["export"]["outs"]]
