"""OpenVINO on the CPU: reads the NMS-free ONNX graph (or the IR ``o2f export --format
openvino`` writes) and compiles it for this CPU; ``dtype=bf16`` sets OpenVINO's inference
precision hint to bf16 (OpenVINO then uses AMX / AVX512-BF16 where present; elsewhere it
keeps float32). int8: :func:`quantize_int8` (NNCF post-training quantisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from o2f.deploy import graph_from, require, to_torch
from o2f.export import OnnxDetector

META_KEYS = ("o2f_model_config", "o2f_class_names", "o2f_inputs")


class OpenVinoDetector(OnnxDetector):
    """:class:`o2f.export.OnnxDetector`'s pre- and post-processing around an OpenVINO
    compiled model."""

    def __init__(self, path: str | Path, precision: str = "f32", threads: int | None = None
                 ) -> None:
        ov = require("openvino", "openvino")
        core = ov.Core()
        model = core.read_model(str(path))
        meta = read_metadata(path, model)
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(model, "CPU", config)
        shape = model.inputs[0].get_partial_shape()
        dims = [d.get_length() if d.is_static else None for d in shape]
        self._setup(path, len(model.inputs), dims, meta, None)

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled(feed)
        return [result[out] for out in self.compiled.outputs]


def read_metadata(path: str | Path, model) -> dict[str, str]:
    """The o2f metadata of an ONNX file (its metadata_props) or an IR (its rt_info)."""
    if Path(path).suffix == ".onnx":
        import onnx

        props = onnx.load(str(path), load_external_data=False).metadata_props
        return {p.key: p.value for p in props}
    return {k: model.get_rt_info([k]).astype(str) for k in META_KEYS if model.has_rt_info([k])}


class OpenVinoPredictor:
    """``predictor(images) -> [{boxes, scores, labels}]`` with OpenVINO (CPU)."""

    def __init__(self, source: str | Path | nn.Module, dtype: torch.dtype = torch.float32, *,
                 device: str | torch.device | None = None, threads: int | None = None,
                 class_names: list[str] | None = None) -> None:
        path, names = graph_from(source, "openvino")
        precision = "bf16" if dtype == torch.bfloat16 else "f32"
        self.runner = OpenVinoDetector(path, precision, threads)
        self.num_classes = self.runner.cfg.num_classes
        self.class_names = (class_names or names or self.runner.class_names
                            or [str(i) for i in range(self.num_classes)])
        self.description = f"openvino {precision}" + (" int8" if "int8" in path.stem else "")

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return to_torch(self.runner([img.cpu() for img in images]))


def save_ir(graph: str | Path, out: str | Path) -> Path:
    """Convert an ONNX graph to OpenVINO IR (``out`` .xml plus its .bin), keeping the o2f
    metadata in the IR's rt_info."""
    ov = require("openvino", "openvino")
    return _save(ov, ov.convert_model(str(graph)), graph, out)


def _save(ov, model, graph: str | Path, out: str | Path) -> Path:
    """Write ``model`` as IR at ``out`` (.xml), with the o2f metadata of ``graph``."""
    for key, value in read_metadata(graph, None).items():
        model.set_rt_info(value, [key])
    out = Path(out).with_suffix(".xml")
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out), compress_to_fp16=False)
    return out


# Operations NNCF would quantise by default that stay float32: int8 goes to the
# convolutions only (as the onnxruntime path), not to the FPN's sums and resampling or
# the normalisations.
FLOAT_TYPES = ["Add", "Multiply", "Subtract", "Divide", "Interpolate", "MVN", "ReduceMean",
               "MaxPool", "MatMul"]


def quantize_int8(graph: str | Path, out: str | Path, calib: str | Path, *, limit: int = 64
                  ) -> Path:
    """Write an int8 OpenVINO IR of the float32 ONNX ``graph`` by NNCF post-training
    quantisation on up to ``limit`` images of ``calib``; the last regression conv (and the
    first conv of each other reader of its input), the decoding and the top-k stay float32
    (NNCF's ignored scope)."""
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino int8")
    from o2f.deploy.onnxruntime import calibration_inputs

    inputs = calibration_inputs(graph, calib, limit)
    model = ov.convert_model(str(graph))
    # NNCF quantises an activation once for all its readers: the regression tower's output
    # is read by the last regression conv and by the objectness tower, so both stay float32
    # or the box distances are computed from int8 features.
    keep_float = [op.get_friendly_name() for op in model.get_ops()
                  if op.get_type_name() == "Convolution" and any(
                      name in op.input_value(1).get_node().get_friendly_name()
                      for name in ("reg_out", "obj_tower.0.", "obj_out"))]
    quantized = nncf.quantize(
        model, nncf.Dataset(inputs), subset_size=len(inputs),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=nncf.IgnoredScope(names=keep_float, types=FLOAT_TYPES, validate=False))
    return _save(ov, quantized, graph, out)


