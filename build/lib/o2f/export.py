"""NMS-free ONNX export and onnxruntime inference.

The exported graph takes a normalised, padded batch and the unpadded sizes and returns the
final detections: decode, per-level top-k, final top-k, and nothing else (no NMS node).

    inputs:  images (B, 3, H, W) float32, normalised as the model does;
             sizes (B, 2) float32, the (h, w) of each image before padding
    outputs: boxes (B, K, 4) x1y1x2y2 in the batch's pixels, scores (B, K), labels (B, K)

K is ``model.topk``; entries with a score at or below ``model.score_thresh`` are padding.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from o2f.config import ModelConfig
from o2f.model.detector import O2F, preprocess_images


class ExportableO2F(nn.Module):
    """The detector from a batch tensor to fixed-size detections (see the module doc)."""

    def __init__(self, model: O2F) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, images: Tensor, sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model.forward_dense(images)
        return self.model.postprocess(out, sizes)


def export_onnx(model: O2F, path: str | Path, *, size: tuple[int, int] = (800, 1344),
                batch: int = 1, dynamic: bool = False, opset: int = 18,
                class_names: list[str] | None = None) -> Path:
    """Write ``model`` to ``path`` as ONNX and check it with onnx.checker.

    ``size`` is the padded input size (a multiple of 32); with ``dynamic`` the batch,
    height and width are free. The model config and class names are stored in the graph's
    metadata, so ``o2f predict --onnx`` needs nothing else.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export needs the export extra: pip install 'o2f[export]'") from e
    if model.cfg.task != "detection":
        raise ValueError("ONNX export covers the box detector only (model.task=detection)")
    h, w = size
    if h % 32 or w % 32:
        raise ValueError(f"--size must be multiples of 32, got {h} x {w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableO2F(model).cpu().eval()
    images = torch.zeros(batch, 3, h, w)
    sizes = torch.tensor([[h, w]] * batch, dtype=torch.float32)
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        height, width = dim("height", min=64, max=4096), dim("width", min=64, max=4096)
        batch_dim = dim("batch", max=256)
        dynamic_shapes = {"images": {0: batch_dim, 2: height, 3: width}, "sizes": {0: batch_dim}}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (images, sizes), input_names=["images", "sizes"],
            output_names=["boxes", "scores", "labels"], opset_version=opset,
            dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
        program.save(str(path))
    graph = onnx.load(str(path))
    meta = {"o2f_model_config": json.dumps(asdict(model.cfg)),
            "o2f_class_names": json.dumps(class_names or [])}
    for key, value in meta.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


def onnx_ops(path: str | Path) -> set[str]:
    """The operator types used in an ONNX graph (to show there is no NonMaxSuppression)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return {node.op_type for node in graph.node}


class OnnxDetector:
    """Runs an exported graph with onnxruntime behind the same pre-processing as the
    PyTorch model: ``detector([image])`` -> ``[{boxes, scores, labels}]`` in the image's
    own pixels, numpy arrays."""

    def __init__(self, path: str | Path, model_cfg: ModelConfig | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        self.fixed = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        meta = self.session.get_modelmeta().custom_metadata_map
        if model_cfg is None:
            if "o2f_model_config" not in meta:
                raise ValueError(f"{path}: no o2f config in the graph's metadata")
            model_cfg = ModelConfig(**json.loads(meta["o2f_model_config"]))
        self.cfg = model_cfg
        self.class_names: list[str] = json.loads(meta.get("o2f_class_names", "[]"))
        self.score_thresh = model_cfg.score_thresh

    def run_batch(self, batch: Tensor, sizes: list[tuple[int, int]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.fixed is not None and tuple(batch.shape[2:]) != self.fixed:
            h, w = self.fixed
            if batch.shape[2] > h or batch.shape[3] > w:
                raise ValueError(f"image batch {tuple(batch.shape[2:])} is larger than the "
                                 f"graph's fixed input {self.fixed}; export with --dynamic")
            batch = nn.functional.pad(batch, (0, w - batch.shape[3], 0, h - batch.shape[2]))
        feed = {"images": batch.numpy().astype(np.float32),
                "sizes": np.asarray(sizes, dtype=np.float32)}
        boxes, scores, labels = self.session.run(None, feed)
        return boxes, scores, labels

    def __call__(self, images: list[Tensor]) -> list[dict[str, np.ndarray]]:
        batch, sizes, factor = preprocess_images(
            images, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
            size_divisible=self.cfg.size_divisible)
        boxes, scores, labels = self.run_batch(batch, sizes)
        results = []
        for i in range(len(images)):
            keep = scores[i] > self.score_thresh
            scale = np.tile(factor[i].numpy(), 2)
            results.append({"boxes": boxes[i][keep] / scale, "scores": scores[i][keep],
                            "labels": labels[i][keep]})
        return results
