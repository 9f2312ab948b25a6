"""NMS-free ONNX export and onnxruntime inference.

The exported graph returns the final detections: decode, per-level top-k, final top-k, and
nothing else (no NMS node). By default it has one input, as ONNX consumers expect:

    inputs:  images (B, 3, H, W) float32 RGB in [0, 1], any H and W with ``--dynamic``;
             normalisation and padding to a multiple of 32 happen inside the graph, and
             the image size is read from the tensor's shape
    outputs: boxes (B, K, 4) x1y1x2y2 in the input's pixels, scores (B, K), labels (B, K)

The graph does not resize: feed images at the size the model was trained for (the
``OnnxDetector`` below resizes as the PyTorch model does). With ``two_inputs=True``
(``o2f export --two-inputs``) the graph takes the earlier pair instead: ``images`` already
normalised and padded, and ``sizes`` (B, 2) float32, the (h, w) of each image before
padding; boxes are then in the batch's pixels.

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
from o2f.data.transforms import PIXEL_MEAN, PIXEL_STD
from o2f.model.detector import O2F, preprocess_images, resize_scale


class ExportableO2F(nn.Module):
    """The detector from RGB images in [0, 1] (B, 3, H, W) to fixed-size detections; with
    ``two_inputs`` from a normalised padded batch and its sizes (see the module doc)."""

    def __init__(self, model: O2F, two_inputs: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.two_inputs = two_inputs
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1) / 255)
        self.register_buffer("std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1) / 255)

    def forward(self, images: Tensor, sizes: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        if self.two_inputs:
            return self.model.postprocess(self.model.forward_dense(images), sizes)
        b, _, h, w = images.shape
        d = max(self.model.cfg.size_divisible, 1)
        batch = (images - self.mean) / self.std
        batch = nn.functional.pad(batch, (0, (d - w % d) % d, 0, (d - h % d) % d))
        ones = images.new_ones(b)
        sizes = torch.stack([ones * h, ones * w], dim=1)  # (B, 2): every image is H x W
        return self.model.postprocess(self.model.forward_dense(batch), sizes)


def export_onnx(model: O2F, path: str | Path, *, size: tuple[int, int] = (800, 1344),
                batch: int = 1, dynamic: bool = False, opset: int = 18,
                class_names: list[str] | None = None, two_inputs: bool = False) -> Path:
    """Write ``model`` to ``path`` as ONNX and check it with onnx.checker.

    ``size`` is the input size (H, W; with ``two_inputs`` the padded size, a multiple of
    32); with ``dynamic`` the batch, height and width are free. ``two_inputs`` exports the
    earlier (normalised padded images, sizes) form (see the module docstring). The model
    config, class names and input form are stored in the graph's metadata, so
    ``o2f predict --onnx`` needs nothing else.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export needs the export extra: pip install 'o2f[export]'") from e
    if model.cfg.task != "detection":
        raise ValueError("ONNX export covers the box detector only (model.task=detection)")
    h, w = size
    if two_inputs and (h % 32 or w % 32):
        raise ValueError(f"--size must be multiples of 32 with two inputs, got {h} x {w}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableO2F(model, two_inputs).cpu().eval()
    images = torch.rand(batch, 3, h, w)
    args: tuple[Tensor, ...] = (images,)
    names = ["images"]
    if two_inputs:
        args += (torch.tensor([[h, w]] * batch, dtype=torch.float32),)
        names.append("sizes")
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        batch_dim = dim("batch", max=256)
        if two_inputs:
            height, width = dim("height", min=64, max=4096), dim("width", min=64, max=4096)
            dynamic_shapes = {"images": {0: batch_dim, 2: height, 3: width},
                              "sizes": {0: batch_dim}}
        else:
            height, width = dim("height", min=32, max=4096), dim("width", min=32, max=4096)
            dynamic_shapes = {"images": {0: batch_dim, 2: height, 3: width}}
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, args, input_names=names,
            output_names=["boxes", "scores", "labels"], opset_version=opset,
            dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
        program.save(str(path))
    graph = onnx.load(str(path))
    meta = {"o2f_model_config": json.dumps(asdict(model.cfg)),
            "o2f_class_names": json.dumps(class_names or []),
            "o2f_inputs": ",".join(names)}
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
    own pixels, numpy arrays. Works with both input forms (see the module docstring)."""

    def __init__(self, path: str | Path, model_cfg: ModelConfig | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self._setup(path, len(inputs), inputs[0].shape,
                    self.session.get_modelmeta().custom_metadata_map, model_cfg)

    def _setup(self, path: str | Path, num_inputs: int, shape: list, meta: dict[str, str],
               model_cfg: ModelConfig | None) -> None:
        """What every runtime reads off a graph: its input form (one or two inputs), a
        fixed input size (H, W) or None, and the o2f metadata (config, class names)."""
        self.two_inputs = num_inputs == 2
        self.fixed = tuple(shape[2:]) if all(isinstance(s, int) for s in shape[2:]) else None
        if model_cfg is None:
            if "o2f_model_config" not in meta:
                raise ValueError(f"{path}: no o2f config in the graph's metadata")
            model_cfg = ModelConfig(**json.loads(meta["o2f_model_config"]))
        self.cfg = model_cfg
        self.class_names: list[str] = json.loads(meta.get("o2f_class_names", "[]"))
        self.score_thresh = model_cfg.score_thresh

    def run_batch(self, batch: Tensor, sizes: list[tuple[int, int]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Two-input graphs: a normalised padded batch and its unpadded sizes."""
        if self.fixed is not None and tuple(batch.shape[2:]) != self.fixed:
            h, w = self.fixed
            if batch.shape[2] > h or batch.shape[3] > w:
                raise ValueError(f"image batch {tuple(batch.shape[2:])} is larger than the "
                                 f"graph's fixed input {self.fixed}; export with --dynamic")
            batch = nn.functional.pad(batch, (0, w - batch.shape[3], 0, h - batch.shape[2]))
        feed = {"images": batch.numpy().astype(np.float32),
                "sizes": np.asarray(sizes, dtype=np.float32)}
        boxes, scores, labels = self._run(feed)
        return boxes, scores, labels

    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs (boxes, scores, labels) for ``feed``."""
        return self.session.run(None, feed)

    def _prepare(self, image: Tensor) -> tuple[Tensor, int, int]:
        """One-input graphs: resize as the model does and pad a fixed-size graph's input
        with the mean colour (zero after the graph's normalisation, as the model pads).
        Returns the (1, 3, H, W) input and the resized (h, w)."""
        h, w = image.shape[-2:]
        scale = resize_scale(h, w, self.cfg.min_size, self.cfg.max_size)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        x = image.float()[None]
        if (nh, nw) != (h, w):
            x = nn.functional.interpolate(x, size=(nh, nw), mode="bilinear",
                                          align_corners=False)
        if self.fixed is not None:
            fh, fw = self.fixed
            if nh > fh or nw > fw:
                raise ValueError(f"image of {nh} x {nw} after resizing is larger than the "
                                 f"graph's fixed input {self.fixed}; export with --dynamic")
            canvas = (torch.tensor(PIXEL_MEAN) / 255).view(1, 3, 1, 1).repeat(1, 1, fh, fw)
            canvas[..., :nh, :nw] = x
            x = canvas
        return x, nh, nw

    def __call__(self, images: list[Tensor]) -> list[dict[str, np.ndarray]]:
        results = []
        if not self.two_inputs:
            prepared = [self._prepare(image) for image in images]
            # one run for a batch of equal sizes, else one run per image (the graph reads
            # every image's size from the batch's shape)
            if len({x.shape for x, _, _ in prepared}) == 1 and len({p[1:] for p in prepared}) == 1:
                runs = [torch.cat([x for x, _, _ in prepared])]
            else:
                runs = [x for x, _, _ in prepared]
            outputs = [self._run({"images": x.numpy()}) for x in runs]
            boxes = np.concatenate([o[0] for o in outputs])
            scores = np.concatenate([o[1] for o in outputs])
            labels = np.concatenate([o[2] for o in outputs])
            for i, (image, (_, nh, nw)) in enumerate(zip(images, prepared, strict=True)):
                keep = scores[i] > self.score_thresh
                h, w = image.shape[-2:]
                scale = np.array([nw / w, nh / h, nw / w, nh / h])
                clipped = np.minimum(boxes[i][keep], [nw, nh, nw, nh])  # a padded input
                results.append({"boxes": clipped / scale, "scores": scores[i][keep],
                                "labels": labels[i][keep]})
            return results
        batch, sizes, factor = preprocess_images(
            images, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
            size_divisible=self.cfg.size_divisible)
        boxes, scores, labels = self.run_batch(batch, sizes)
        for i in range(len(images)):
            keep = scores[i] > self.score_thresh
            scale = np.tile(factor[i].numpy(), 2)
            results.append({"boxes": boxes[i][keep] / scale, "scores": scores[i][keep],
                            "labels": labels[i][keep]})
        return results
