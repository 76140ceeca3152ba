"""A trained model as one ONNX file that runs without torch or petbreeds: ``models/model.onnx``, preprocessing inside.

    petbreeds export                                   # models/model.pt -> models/model.onnx (its path, .onnx)
    petbreeds export --model other.pt --out other.onnx
    export_onnx(Path("models/model.pt"), Path("models/model.onnx"))

Contract: input ``image``, uint8 ``[N, H, W, 3]`` RGB, any H and W (one size per call); output ``probabilities``,
float32 ``[N, classes]``, in the vocab's order. The graph does what ``petbreeds predict`` does after decoding: the
centred square crop (``resize_method: crop``; ``squish`` keeps the whole image), the antialiased bilinear resize to
``item_size`` rounded to uint8 (the presizing), the antialiased resize to ``size``, ImageNet normalisation, the
network, softmax. ONNX's Resize with ``antialias=1`` (opset 18) is the same filter as torch's antialiased bilinear
resize when it excludes the outside; their uint8 fixed-point roundings differ: by at most 2 grey levels, 0.05 on
average over real pets at 160 -> 128 px.
``resize_method: pad`` is not exported.

Metadata (``custom_metadata_map`` in onnxruntime): :data:`FORMAT_KEY`, ``vocab`` (a JSON list), ``item_size``,
``size``, ``resize_method`` and ``source_md5``, the md5 of the checkpoint it was exported from. A client decodes JPEGs
as petbreeds does, at a reduced scale that keeps ``item_size`` (Pillow's ``draft``; :mod:`petbreeds.serve.onnx_model`).

The network is exported by torch's ``torch.export``-based exporter (``dynamo=True``, onnxscript); the preprocessing
graph is written here with ONNX's own helpers, because its shapes depend on the image's (a crop of min(H, W)) and
``torch.export`` cannot trace an antialiased resize of a data-dependent size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from petbreeds.atomic import atomic_output
from petbreeds.digest import file_digest
from petbreeds.errors import PetbreedsError
from petbreeds.learn.checkpoint import Checkpoint, load_checkpoint
from petbreeds.runtime import default_model

FORMAT_KEY, FORMAT = "format", "petbreeds-onnx/1"
INPUT, OUTPUT = "image", "probabilities"
OPSET = 18  # Resize's antialias attribute is new in opset 18
EXPORTED_METHODS = ("crop", "squish")
_PIXELS = "pixels"  # the network's input: the preprocessing's output


def _constant(name: str, value: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(value, name)


def preprocessing(ckpt: Checkpoint) -> onnx.GraphProto:
    """uint8 ``image`` [N, H, W, 3] -> float32 ``pixels`` [N, 3, size, size]: the valid transforms of ``ckpt``."""
    if ckpt.resize_method not in EXPORTED_METHODS:
        raise PetbreedsError(
            f"the checkpoint's resize_method is {ckpt.resize_method!r}; ONNX export supports "
            f"{' and '.join(EXPORTED_METHODS)}: train with data.resize_method crop (the default), or serve with "
            "petbreeds predict / the MLflow pyfunc"
        )
    nodes = []
    square = INPUT
    if ckpt.resize_method == "crop":  # PresizedImages' valid window: the centred square of side min(H, W)
        nodes += [
            helper.make_node("Shape", [INPUT], ["hw"], start=1, end=3),
            helper.make_node("ReduceMin", ["hw"], ["side"], keepdims=1),
            helper.make_node("Sub", ["hw", "side"], ["excess"]),
            helper.make_node("Div", ["excess", "two"], ["start"]),  # int(0.5 * excess): floor, as presize
            helper.make_node("Add", ["start", "side"], ["end"]),
            helper.make_node("Slice", [INPUT, "start", "end", "axes_hw"], ["square"]),
        ]
        square = "square"
    nodes += [
        helper.make_node("Transpose", [square], ["chw"], perm=[0, 3, 1, 2]),
        helper.make_node("Shape", ["chw"], ["nc"], start=0, end=2),
        helper.make_node("Concat", ["nc", "item_hw"], ["item_shape"], axis=0),
        helper.make_node("Concat", ["nc", "size_hw"], ["size_shape"], axis=0),
    ]
    # Both resizes on uint8, as torch's: the presized item is a uint8 image (rounded), then resized again. Torch
    # (Pillow's filter) clips the filter's support to the image and renormalises: ONNX's exclude_outside=1. With it
    # the two differ by at most 2 grey levels (rounding); without it, by up to 24 along the edges.
    resize = {"mode": "linear", "antialias": 1, "exclude_outside": 1, "coordinate_transformation_mode": "half_pixel"}
    nodes += [
        helper.make_node("Resize", ["chw", "", "", "item_shape"], ["item"], **resize),
        helper.make_node("Resize", ["item", "", "", "size_shape"], ["small"], **resize),
        helper.make_node("Cast", ["small"], ["float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["float", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], [_PIXELS]),
    ]
    scale = np.float32(255)  # the model sees (x / 255 - mean) / std: on 0..255, (x - 255 mean) / (255 std)
    constants = [
        _constant("two", np.array([2], np.int64)),
        _constant("axes_hw", np.array([1, 2], np.int64)),
        _constant("item_hw", np.array([ckpt.item_size] * 2, np.int64)),
        _constant("size_hw", np.array([ckpt.size] * 2, np.int64)),
        _constant("mean", np.array(ckpt.mean, np.float32).reshape(1, 3, 1, 1) * scale),
        _constant("std", np.array(ckpt.std, np.float32).reshape(1, 3, 1, 1) * scale),
    ]
    # Its own names apart from the network's (which has its own "mean", ...): merging needs them distinct.
    own = {name for node in nodes for name in [*node.input, *node.output]} - {INPUT, _PIXELS, ""}
    for node in nodes:
        node.input[:] = [f"preprocessing/{n}" if n in own else n for n in node.input]
        node.output[:] = [f"preprocessing/{n}" if n in own else n for n in node.output]
    for constant in constants:
        constant.name = f"preprocessing/{constant.name}"
    return helper.make_graph(
        nodes,
        "preprocessing",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", "H", "W", 3])],
        [helper.make_tensor_value_info(_PIXELS, TensorProto.FLOAT, ["N", 3, ckpt.size, ckpt.size])],
        constants,
    )


def _network(model: nn.Module, ckpt: Checkpoint) -> onnx.ModelProto:
    """The network and its softmax: float32 ``pixels`` [N, 3, size, size] -> ``probabilities`` [N, classes]."""
    example = torch.zeros(2, 3, ckpt.size, ckpt.size)
    program = torch.onnx.export(
        nn.Sequential(model, nn.Softmax(dim=1)).eval(),
        (example,),
        input_names=[_PIXELS],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("N")},),
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return program.model_proto


def exported_model(model_path: Path) -> onnx.ModelProto:
    """The checkpoint at ``model_path`` as one ONNX model (see the module's docstring), checked by ONNX's checker."""
    model, ckpt = load_checkpoint(model_path, torch.device("cpu"))
    network = _network(model, ckpt)
    opset = next(o.version for o in network.opset_import if o.domain in ("", "ai.onnx"))
    pre = helper.make_model(
        preprocessing(ckpt), opset_imports=[helper.make_opsetid("", opset)], ir_version=network.ir_version
    )
    merged = onnx.compose.merge_models(pre, network, io_map=[(_PIXELS, _PIXELS)])
    del merged.metadata_props[:]
    helper.set_model_props(
        merged,
        {
            FORMAT_KEY: FORMAT,
            "vocab": json.dumps(ckpt.vocab),
            "item_size": str(ckpt.item_size),
            "size": str(ckpt.size),
            "resize_method": ckpt.resize_method,
            "source_md5": file_digest(model_path, "md5"),
        },
    )
    merged.producer_name = "petbreeds"
    onnx.checker.check_model(merged, full_check=True)
    return merged


def export_onnx(model_path: Path, out: Path) -> None:
    """Write the checkpoint at ``model_path`` as ONNX to ``out``, atomically."""
    model = exported_model(Path(model_path))
    with atomic_output(out) as tmp:
        onnx.save(model, tmp)


def cli(argv: list[str]) -> int:
    """``petbreeds export [--model models/model.pt] [--out models/model.onnx]``."""
    parser = argparse.ArgumentParser(
        prog="petbreeds export",
        description="The model as one ONNX file: uint8 images [N, H, W, 3] in, probabilities out, preprocessing "
        "inside; runs with onnxruntime alone.",
    )
    parser.add_argument(
        "--model", type=Path, help="checkpoint (default: models/model.pt here, else in the project root)"
    )
    parser.add_argument("--out", type=Path, help="the ONNX file to write (default: the model's path, .onnx)")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    out = args.out or model.with_suffix(".onnx")
    export_onnx(model, out)
    print(f"{model} exported to {out}")
    return 0
