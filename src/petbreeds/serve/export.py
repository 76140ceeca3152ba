"""A trained model as one ONNX file that runs without torch or petbreeds: ``models/model.onnx``, preprocessing inside.

    petbreeds export                                   # models/model.pt -> models/model.onnx (its path, .onnx)
    petbreeds export --model other.pt --out other.onnx
    export_onnx(Path("models/model.pt"), Path("models/model.onnx"))

Contract: input ``image``, uint8 ``[N, H, W, 3]`` RGB, any H and W (one size per call); output ``probabilities``,
float32 ``[N, classes]``, in the vocab's order. The graph does what ``petbreeds predict`` does after decoding: the
centred square crop (``resize_method: crop``; ``squish`` keeps the whole image), the antialiased bilinear resize to
``item_size`` rounded to uint8 (the presizing), the antialiased resize to ``size``, ImageNet normalisation, the
network, softmax. The presizing is ONNX's Resize (``antialias=1``, opset 18: torch's filter, rounded within 1 grey
level of torch's); the resize to ``size``, from one fixed size to another, is torch's uint8 kernel bit for bit
(:func:`_exact_resize`): networks amplify a grey level's difference into probabilities 0.1 apart.
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
        # The presizing from the image's size: ONNX's Resize with antialias=1 is torch's antialiased bilinear filter
        # when it excludes the outside (torch, as Pillow, clips the filter to the image and renormalises); their
        # uint8 roundings differ by at most 1 grey level, on under 1 % of pixels (without exclude_outside, by up to
        # 24 along the edges).
        helper.make_node(
            "Resize",
            ["chw", "", "", "item_shape"],
            ["item"],
            mode="linear",
            antialias=1,
            exclude_outside=1,
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    constants = [
        _constant("two", np.array([2], np.int64)),
        _constant("axes_hw", np.array([1, 2], np.int64)),
        _constant("item_hw", np.array([ckpt.item_size] * 2, np.int64)),
    ]
    small = "item"
    if ckpt.size != ckpt.item_size:  # ValidAugment resizes only then
        nodes += _exact_resize("item", "small", ckpt.item_size, ckpt.size, constants)
        small = "small"
    scale = np.float32(255)  # the model sees (x / 255 - mean) / std: on 0..255, (x - 255 mean) / (255 std)
    nodes += [
        helper.make_node("Cast", [small], ["float"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["float", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], [_PIXELS]),
    ]
    constants += [
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


def _int16_weights(n_in: int, n_out: int) -> tuple[np.ndarray, int]:
    """torch's uint8 antialiased bilinear resize along one axis, ``n_in`` -> ``n_out`` pixels, as its CPU kernel
    computes it (``_compute_index_ranges_int16_weights``): Pillow's triangle filter, widened by the scale when it
    shrinks, clipped to the image and normalised, then as integers of ``precision`` bits. Matrix ``[n_out, n_in]``."""
    scale = n_in / n_out
    support, inverse = (scale, 1 / scale) if scale >= 1 else (1.0, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        low, high = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = np.maximum(0.0, 1 - np.abs((np.arange(low, high) - centre + 0.5) * inverse))
        weights[i, low:high] = taps / taps.sum()
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return np.floor(weights * (1 << precision) + 0.5), precision


def _exact_resize(source: str, out: str, n_in: int, n_out: int, constants: list[TensorProto]) -> list[onnx.NodeProto]:
    """uint8 ``source`` [N, 3, n_in, n_in] -> uint8 ``out`` [N, 3, n_out, n_out], bit for bit torch's uint8 kernel
    (ValidAugment's resize): a pass along the width, rounded to uint8, then along the height, each a product with
    :func:`_int16_weights` in float32 or float64 (exact on these integers), rounded as the kernel rounds (add half,
    shift).
    ONNX's Resize rounds otherwise: up to 2 grey levels apart, which moves a network's probabilities by up to 0.1."""
    weights, precision = _int16_weights(n_in, n_out)
    # float32 holds every sum exactly while the weights' sum (2**precision) times 255 stays below 2**24 (the item
    # shrinks by less than about 4x), and is several times faster than float64 in onnxruntime
    exact_in_float32 = (1 << precision) * 255 < 1 << 24
    dtype, onnx_type = (np.float32, TensorProto.FLOAT) if exact_in_float32 else (np.float64, TensorProto.DOUBLE)
    constants += [
        _constant(f"{out}_width", weights.T.astype(dtype)),
        _constant(f"{out}_height", weights.astype(dtype)),
        _constant(f"{out}_half", np.array(1 << (precision - 1), dtype)),
        _constant(f"{out}_one", np.array(1 << precision, dtype)),
        _constant(f"{out}_low", np.array(0, dtype)),
        _constant(f"{out}_high", np.array(255, dtype)),
    ]

    def rounded(product: str, result: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Add", [product, f"{out}_half"], [f"{result}_sum"]),
            helper.make_node("Div", [f"{result}_sum", f"{out}_one"], [f"{result}_scaled"]),
            helper.make_node("Floor", [f"{result}_scaled"], [f"{result}_floor"]),
            helper.make_node("Clip", [f"{result}_floor", f"{out}_low", f"{out}_high"], [result]),
        ]

    return [
        helper.make_node("Cast", [source], [f"{out}_wide"], to=onnx_type),
        helper.make_node("MatMul", [f"{out}_wide", f"{out}_width"], [f"{out}_across"]),
        *rounded(f"{out}_across", f"{out}_rows"),
        helper.make_node("MatMul", [f"{out}_height", f"{out}_rows"], [f"{out}_down"]),
        *rounded(f"{out}_down", f"{out}_double"),
        helper.make_node("Cast", [f"{out}_double"], [out], to=TensorProto.UINT8),
    ]


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
