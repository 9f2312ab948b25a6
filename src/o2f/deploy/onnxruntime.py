"""onnxruntime on the CPU: the float32 NMS-free graph, or its int8 QDQ form.

:func:`quantize_int8` writes the int8 graph by static post-training quantisation
(``onnxruntime.quantization.quantize_static``, QDQ format): activation ranges calibrated on
a folder of images, weights per output channel. Only convolutions are quantised, and not
the last regression conv (its outputs are pixel distances up to the image size): the
decoding, top-k and every index operation stay float32, so the graph stays NMS-free and its
boxes as precise as the features allow.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from o2f.deploy import graph_from, require, to_torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class OnnxRuntimePredictor:
    """``predictor(images) -> [{boxes, scores, labels}]`` with onnxruntime (CPU)."""

    def __init__(self, source: str | Path | nn.Module, dtype: torch.dtype = torch.float32, *,
                 device: str | torch.device | None = None, threads: int | None = None,
                 class_names: list[str] | None = None) -> None:
        require("onnxruntime", "onnxruntime")
        from o2f.export import OnnxDetector

        if dtype != torch.float32:
            raise ValueError("the onnxruntime backend runs float32 graphs (or int8 ones from "
                             "`o2f export --int8`); for bf16 use --backend eager or openvino")
        path, names = graph_from(source, "onnxruntime")
        self.runner = OnnxDetector(path, threads=threads)
        self.num_classes = self.runner.cfg.num_classes
        self.class_names = (class_names or names or self.runner.class_names
                            or [str(i) for i in range(self.num_classes)])
        self.description = "onnxruntime " + ("int8" if is_quantized(path) else "float32")

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return to_torch(self.runner([img.cpu() for img in images]))


def is_quantized(path: str | Path) -> bool:
    """Whether an ONNX graph holds quantisation nodes."""
    import onnx

    if Path(path).suffix != ".onnx":
        return False
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in graph.node)


def calibration_images(folder: str | Path, limit: int = 64) -> list[Path]:
    """The first ``limit`` images of ``folder`` (sorted, searched recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(2, "calibration folder not found", str(folder))
    files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no images to calibrate on (jpg, png, bmp, webp)")
    return files[:limit]


def calibration_inputs(graph: str | Path, folder: str | Path, limit: int = 64
                       ) -> list[np.ndarray]:
    """The graph's ``images`` input (1, 3, H, W) float32 for each calibration image,
    prepared as at inference (resized as the model does, padded for fixed-size graphs)."""
    from torchvision.io import ImageReadMode, decode_image

    from o2f.export import OnnxDetector

    runner = OnnxDetector(graph)
    if runner.two_inputs:
        raise ValueError("int8 export covers the default one-input graph")
    inputs = []
    for file in calibration_images(folder, limit):
        image = decode_image(str(file), mode=ImageReadMode.RGB).float() / 255
        inputs.append(runner._prepare(image)[0].numpy())
    return inputs


def float_convolutions(model) -> list[str]:
    """Names of the Conv nodes of an o2f ONNX graph that int8 leaves float32: the box
    convolution (weights ``reg_out``) and every other reader of its input (the objectness
    tower). A quantised reader would put a quantise / dequantise pair on that shared
    activation, and the box distances would be computed from int8 features."""
    initializers = {init.name for init in model.graph.initializer}
    box_inputs = {n.input[0] for n in model.graph.node if n.op_type == "Conv" and any(
        "reg_out" in i for i in n.input if i in initializers)}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and n.input[0] in box_inputs]


def quantize_int8(graph: str | Path, out: str | Path, calib: str | Path, *,
                  limit: int = 64) -> Path:
    """Write the static int8 (QDQ) form of the float32 graph ``graph`` to ``out``,
    calibrated on up to ``limit`` images of the folder ``calib``."""
    require("onnxruntime", "onnxruntime")
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from o2f.precision import cpu_features

    inputs = calibration_inputs(graph, calib, limit)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(inputs)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"images": x}

    model = onnx.load(str(graph))
    keep_float = float_convolutions(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(graph), str(out), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
        # without VNNI, u8 x s8 products can saturate 16-bit sums: 7-bit weights avoid it
        reduce_range=not cpu_features().vnni,
        op_types_to_quantize=["Conv"], nodes_to_exclude=keep_float)
    quantized = onnx.load(str(out))
    for prop in model.metadata_props:  # the o2f config and class names travel along
        quantized.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(quantized, str(out))
    return out
