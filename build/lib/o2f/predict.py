"""Detect objects in image files with a trained checkpoint; draw and save the results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from o2f.data.coco import load_image
from o2f.engine import encode_masks, model_from_checkpoint

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6",
           "#bfef45", "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3"]


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


def predict_images(paths: list[Path], out_dir: str | Path, *,
                   checkpoint: str | Path | None = None, onnx: str | Path | None = None,
                   score_thresh: float = 0.3, device: str | None = None) -> list[dict[str, Any]]:
    """Run a checkpoint's model (or an exported ONNX graph through onnxruntime, with the
    same pre-processing) on each image; write ``out_dir/<name>.png`` with the boxes (and,
    for an instance model, the masks) drawn and ``out_dir/detections.json`` (boxes x1y1x2y2
    in the file's pixels; masks as COCO RLE ``segmentation`` with str counts)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if onnx is not None:
        from o2f.export import OnnxDetector

        detector = OnnxDetector(onnx)
        class_names = detector.class_names

        def model(images):
            return [{k: torch.from_numpy(v) for k, v in d.items()}
                    for d in detector([img.cpu() for img in images])]
        num_classes = detector.cfg.num_classes
    elif checkpoint is not None:
        model, _, ckpt = model_from_checkpoint(checkpoint, device=device)
        model.fuse_batchnorm()
        class_names = ckpt.get("class_names") or []
        num_classes = model.cfg.num_classes
    else:
        raise ValueError("predict_images needs a checkpoint or an ONNX file")
    class_names = class_names or [str(i) for i in range(num_classes)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in tqdm(paths, desc="predict", dynamic_ncols=True):
        image = load_image(path).as_subclass(torch.Tensor)
        with torch.inference_mode():
            (det,) = model([image.to(device).float() / 255])
        keep = det["scores"] >= score_thresh
        boxes, scores = det["boxes"][keep].cpu(), det["scores"][keep].cpu().tolist()
        labels = det["labels"][keep].cpu().tolist()
        masks = det["masks"][keep].cpu() if "masks" in det else None
        picture = draw(image, boxes, labels, scores, class_names, masks)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(out_dir / f"{path.stem}.png")
        found = [{"box": [round(v, 2) for v in b], "score": round(s, 4), "label": int(c),
                  "class": class_names[c] if c < len(class_names) else str(c)}
                 for b, s, c in zip(boxes.tolist(), scores, labels, strict=True)]
        if masks is not None:
            for record, rle in zip(found, encode_masks(masks), strict=True):
                record["segmentation"] = rle
        records.append({"file": str(path), "detections": found})
    (out_dir / "detections.json").write_text(json.dumps(records, indent=1))
    return records
