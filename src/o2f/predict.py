"""Detect objects in images and videos with a trained checkpoint; draw and save the results.

Images (files, folders, globs) give ``<name>.png`` pictures, ``detections.json`` and
``detections.jsonl`` (one line per image, written as each is done); a video file gives an
annotated ``<name>.mp4`` and ``<name>.jsonl`` (one line per frame). Frames stream through
the detector in batches, so memory stays flat over a long video; a frame that cannot be
read stops the run with a one-line error after everything before it has been saved.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from o2f.checkpoint import load_checkpoint, model_from_checkpoint
from o2f.engine import encode_masks
from o2f.video import (
    Frame,
    FrameError,
    VideoWriter,
    count_frames,
    read_image_frames,
    read_video,
    video_rate,
)

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3"]

Detector = Callable[[list[Tensor]], list[dict[str, Tensor]]]


def draw(image: torch.Tensor, boxes: torch.Tensor, labels: list[int], scores: list[float],
         class_names: list[str], masks: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 3 x H x W picture with one coloured, captioned box per detection, and its mask
    (K x H x W bool, optional) filled half-transparent in the same colour."""
    captions = [f"{class_names[c] if c < len(class_names) else c} {s:.2f}"
                for c, s in zip(labels, scores, strict=True)]
    colors = [PALETTE[c % len(PALETTE)] for c in labels]
    if not captions:
        return image
    if masks is not None:
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.5, colors=colors)
    width = max(1, round(max(image.shape[-2:]) / 300))
    return draw_bounding_boxes(image, boxes, captions, colors=colors, width=width)


def load_detector(checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                  device: str | None = None, *, tile: int | None = None,
                  overlap: int | None = None, batch_size: int = 8,
                  backend: str | None = None, dtype: str | torch.dtype = "float32"
                  ) -> tuple[Detector, list[str]]:
    """A detector (list of 3 x H x W float images in [0, 1] -> list of boxes / scores /
    labels dicts, boxes x1y1x2y2 in each image's pixels) and its class names, from a
    checkpoint or an exported graph, run by ``backend`` (:func:`o2f.deploy.load_backend`:
    eager by default, onnxruntime for an ONNX file) in ``dtype``. With ``tile``, each
    image is predicted tile by tile (:func:`o2f.tiling.predict_tiled`)."""
    from o2f.deploy import load_backend

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if onnx is None and checkpoint is None:
        raise ValueError("load_detector needs a checkpoint or an ONNX file")
    backend = backend or ("onnxruntime" if onnx is not None else "eager")
    if onnx is not None and backend == "eager":
        raise ValueError("an exported graph runs with --backend onnxruntime or openvino")
    source = onnx if onnx is not None else checkpoint
    if backend == "eager":  # the model on the device it runs on
        source, _, _ = model_from_checkpoint(checkpoint, device=device)
        names = load_checkpoint(checkpoint).get("class_names")
    else:
        names = None
    model = load_backend(backend, source, dtype, device=device, class_names=names)
    return ((model if tile is None else _tiled(model, tile, overlap, batch_size)),
            model.class_names)


def predict_frames(model: Detector, frames: Iterable[Frame], *, class_names: list[str],
                   write: Callable[[Frame, Tensor, dict[str, Any]], None],
                   batch_size: int = 8, score_thresh: float = 0.3, total: int | None = None,
                   desc: str = "predict", device: str = "cpu") -> dict[str, float]:
    """Run ``model`` over ``frames`` in batches of like-sized frames and hand each frame, its
    picture with the detections drawn (uint8 3 x H x W) and its record (``detections``:
    boxes x1y1x2y2 in the frame's pixels, scores, labels, class names) to ``write``, in order.

    A :class:`FrameError` from the frame source is raised after the frames before it have
    been written. Returns ``{"frames": n, "seconds": s, "fps": n / s}``."""
    start, done = time.perf_counter(), 0
    pending: list[Frame] = []

    def flush() -> None:
        nonlocal done
        detections = model([f.image.to(device).float() / 255 for f in pending])
        for frame, det in zip(pending, detections, strict=True):
            picture, record = _annotate(frame, det, class_names, score_thresh)
            write(frame, picture, record)
        done += len(pending)
        bar.update(len(pending))
        pending.clear()

    frames = iter(frames)
    with tqdm(total=total, desc=desc, unit="frame", dynamic_ncols=True) as bar:
        error = None
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except FrameError as e:
                error = e
                break
            if pending and (len(pending) == batch_size
                            or pending[0].image.shape != frame.image.shape):
                flush()
            pending.append(frame)
        if pending:
            flush()
    seconds = time.perf_counter() - start
    if error is not None:
        raise error
    return {"frames": done, "seconds": seconds, "fps": done / max(seconds, 1e-9)}


def _annotate(frame: Frame, det: dict[str, Tensor], class_names: list[str],
              score_thresh: float) -> tuple[Tensor, dict[str, Any]]:
    keep = det["scores"] >= score_thresh
    boxes, scores = det["boxes"][keep].float().cpu(), det["scores"][keep].float().cpu().tolist()
    labels = det["labels"][keep].cpu().tolist()
    masks = det["masks"][keep].cpu() if "masks" in det else None
    picture = draw(frame.image, boxes, labels, scores, class_names, masks)
    found = [{"box": [round(v, 2) for v in b], "score": round(s, 4), "label": int(c),
              "class": class_names[c] if c < len(class_names) else str(c)}
             for b, s, c in zip(boxes.tolist(), scores, labels, strict=True)]
    if masks is not None:
        for record, rle in zip(found, encode_masks(masks), strict=True):
            record["segmentation"] = rle
    return picture, {"file": str(frame.file), "detections": found}


def predict_images(paths: list[Path], out_dir: str | Path, *,
                   checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                   score_thresh: float = 0.3, device: str | None = None,
                   tile: int | None = None, overlap: int | None = None, batch_size: int = 8,
                   model: Detector | None = None, class_names: list[str] | None = None
                   ) -> list[dict[str, Any]]:
    """Run a checkpoint's model (or an exported ONNX graph, or a ``model`` given directly
    with its ``class_names``) on each image; write ``out_dir/<name>.png`` with the boxes
    (and, for an instance model, the masks) drawn, ``out_dir/detections.jsonl`` line by line
    and ``out_dir/detections.json`` at the end (boxes x1y1x2y2 in the file's pixels; masks as
    COCO RLE ``segmentation`` with str counts). With ``tile``, large images are predicted tile
    by tile and merged without NMS (:mod:`o2f.tiling`). An unreadable image stops the run
    with :class:`o2f.video.FrameError`; what was done before it is saved."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, class_names = _detector(model, class_names, checkpoint, onnx, device, tile,
                                   overlap, batch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with open(out_dir / "detections.jsonl", "w", encoding="utf-8") as lines:
        def write(frame: Frame, picture: Tensor, record: dict[str, Any]) -> None:
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(
                out_dir / f"{frame.file.stem}.png")
            records.append(record)
            lines.write(json.dumps(record) + "\n")
            lines.flush()

        try:
            predict_frames(model, read_image_frames(list(paths)),
                           class_names=class_names or [], write=write,
                           batch_size=1 if tile else batch_size, score_thresh=score_thresh,
                           total=len(paths), device=device)
        finally:
            (out_dir / "detections.json").write_text(json.dumps(records, indent=1))
    return records


def _detector(model: Detector | None, class_names: list[str] | None,
              checkpoint: str | Path | None, onnx: str | Path | None, device: str,
              tile: int | None, overlap: int | None, batch_size: int
              ) -> tuple[Detector, list[str] | None]:
    """The given model (wrapped for tiling when ``tile`` is set), or one loaded from
    ``checkpoint`` / ``onnx``, with its class names."""
    if model is None:
        return load_detector(checkpoint, onnx, device, tile=tile, overlap=overlap,
                             batch_size=batch_size)
    return (model if tile is None else _tiled(model, tile, overlap, batch_size)), class_names


def _tiled(model: Detector, tile: int, overlap: int | None, batch_size: int) -> Detector:
    from o2f.tiling import predict_tiled

    return lambda images: [predict_tiled(model, img, tile=tile, overlap=overlap,
                                         batch_size=batch_size) for img in images]


def predict_video(path: str | Path, out_dir: str | Path, *,
                  checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                  score_thresh: float = 0.3, device: str | None = None,
                  tile: int | None = None, overlap: int | None = None, batch_size: int = 8,
                  model: Detector | None = None, class_names: list[str] | None = None
                  ) -> dict[str, Any]:
    """Run the detector over a video file, streamed: write ``out_dir/<name>.mp4`` with the
    detections drawn (same frame rate) and ``out_dir/<name>.jsonl`` with one record per
    frame (``frame``, ``time`` in seconds, ``detections`` as in :func:`predict_images`).
    A frame that cannot be decoded stops the run with :class:`o2f.video.FrameError` naming
    the file and the frame; the frames before it stay in both outputs.

    Returns ``{"frames", "seconds", "fps", "video", "jsonl"}``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, class_names = _detector(model, class_names, checkpoint, onnx, device, tile,
                                   overlap, batch_size)
    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    video_out, jsonl_out = out_dir / f"{path.stem}.mp4", out_dir / f"{path.stem}.jsonl"
    frames = read_video(path)
    first = next(frames, None)  # opens the file: an unreadable video fails here
    writer = VideoWriter(video_out, fps=video_rate(path) or 25)
    with writer, open(jsonl_out, "w", encoding="utf-8") as lines:
        def write(frame: Frame, picture: Tensor, record: dict[str, Any]) -> None:
            writer.write(picture)
            lines.write(json.dumps({"frame": frame.index, "time": frame.time,
                                    "detections": record["detections"]}) + "\n")
            lines.flush()

        def stream() -> Iterable[Frame]:
            if first is not None:
                yield first
                yield from frames

        summary = predict_frames(model, stream(), class_names=class_names or [], write=write,
                                 batch_size=1 if tile else batch_size,
                                 score_thresh=score_thresh, total=count_frames(path),
                                 desc=path.name, device=device)
    return {**summary, "video": str(video_out), "jsonl": str(jsonl_out)}
