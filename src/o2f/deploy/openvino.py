"""OpenVINO on the CPU: reads the NMS-free ONNX graph (or the IR ``o2f export --format
openvino`` writes) and compiles it for this CPU; ``dtype=bf16`` sets OpenVINO's inference
precision hint to bf16 (OpenVINO then uses AMX / AVX512-BF16 where present; elsewhere it
keeps float32). int8: :func:`quantize_int8` (the static QDQ graph, run by OpenVINO).
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
        # a QDQ graph arrives as FakeQuantize operations: OpenVINO runs those convs in int8
        self.int8 = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
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
        self.description = f"openvino {precision}" + (" int8" if self.runner.int8 else "")

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


def quantize_int8(graph: str | Path, out: str | Path, calib: str | Path, *, limit: int = 64
                  ) -> Path:
    """Write an int8 OpenVINO IR of the float32 ONNX ``graph``: the static QDQ graph of
    :func:`o2f.deploy.onnxruntime.quantize_int8` (the same calibration on up to ``limit``
    images of ``calib``, the same float32 box convolution), converted to IR, where
    OpenVINO runs each quantise / dequantise pair as an int8 convolution.

    NNCF's own post-training quantisation was measured against it and lost more AP (-0.040
    with its defaults on the digits preset, -0.013 at best; docs/benchmarks.md)."""
    import tempfile

    from o2f.deploy.onnxruntime import quantize_int8 as quantize_qdq

    require("openvino", "openvino")
    with tempfile.TemporaryDirectory(prefix="o2f-qdq-") as work:
        qdq = quantize_qdq(graph, Path(work) / "int8.onnx", calib, limit=limit)
        return save_ir(qdq, out)
