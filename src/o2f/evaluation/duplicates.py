"""The duplicate rate: how often an end-to-end detector reports the same object twice.

A duplicate is a detection scoring at least ``score`` whose best ground truth of its class
(IoU at least ``iou``) is also the best ground truth of a higher-scored detection that
overlaps it at IoU ``iou`` or more. NMS at that IoU would remove every one of them; AP
barely notices low-scored ones, a user looking at a thresholded picture does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert, box_iou

from o2f.evaluation.coco import _as_coco, _load_detections

__all__ = ["duplicate_pairs", "duplicate_rate", "without_duplicates"]


def duplicate_pairs(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor,
                    gt_labels: Tensor, *, score: float = 0.3, iou: float = 0.5
                    ) -> list[tuple[int, int, int]]:
    """The duplicates among one image's detections (boxes x1y1x2y2), as triples (i, j, g):
    detection i is a duplicate of detection j, the best-scored of the higher-scored
    detections on the same ground truth g that overlap i. Indices into the inputs."""
    keep = torch.nonzero(scores >= score).squeeze(1)
    keep = keep[scores[keep].argsort(descending=True, stable=True)]
    if keep.numel() == 0 or gt_boxes.numel() == 0:
        return []
    b, c = boxes[keep].float(), labels[keep].to(gt_labels.device)
    to_gt = box_iou(b, gt_boxes.float().reshape(-1, 4)) * (c[:, None] == gt_labels[None])
    best, matched = to_gt.max(1)
    matched = torch.where(best >= iou, matched, -1)
    higher = torch.ones(len(b), len(b), dtype=torch.bool, device=b.device).tril(-1)
    repeats = ((box_iou(b, b) >= iou) & (matched[:, None] == matched[None])
               & (matched[:, None] >= 0) & (c[:, None] == c[None]) & higher)
    rows = torch.nonzero(repeats.any(1)).squeeze(1)
    first = repeats[rows].to(torch.uint8).argmax(1)  # the best-scored detection repeated
    return list(zip(keep[rows].tolist(), keep[first].tolist(), matched[rows].tolist(),
                    strict=True))


def _duplicates_by_image(gt_json: Any, detections: Any, score: float, iou: float
                         ) -> tuple[Any, dict[int, tuple[list[dict[str, Any]], list[int]]]]:
    """The ground truth's COCO object and, per image with detections, (its detections,
    the indices of the duplicates among them)."""
    coco = _as_coco(gt_json)

    def xyxy(records: list[dict[str, Any]]) -> Tensor:
        boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32)
        return box_convert(boxes.reshape(-1, 4), "xywh", "xyxy")

    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in _load_detections(detections):
        by_image.setdefault(int(r["image_id"]), []).append(r)
    found = {}
    for image_id, dets in by_image.items():
        gts = [a for a in coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        pairs = duplicate_pairs(
            xyxy(dets), torch.tensor([float(d["score"]) for d in dets]),
            torch.tensor([int(d["category_id"]) for d in dets]), xyxy(gts),
            torch.tensor([int(a["category_id"]) for a in gts], dtype=torch.int64),
            score=score, iou=iou)
        found[image_id] = (dets, [i for i, _, _ in pairs])
    return coco, found


def duplicate_rate(gt_json: Any, detections: Any, *, score: float = 0.3,
                   iou: float = 0.5) -> float:
    """Mean number of duplicates per image of the ground truth among the detections.

    ``gt_json`` and ``detections`` as for :func:`o2f.evaluation.coco_evaluate` (a path, a
    dict or a COCO object; a results JSON path or the list itself, bbox as x, y, w, h).
    Crowd boxes are not objects here."""
    coco, found = _duplicates_by_image(gt_json, detections, score, iou)
    total = sum(len(dups) for _, dups in found.values())
    return total / max(len(coco.getImgIds()), 1)


def without_duplicates(gt_json: Any, detections: Any, *, score: float = 0.3,
                       iou: float = 0.5) -> list[dict[str, Any]]:
    """The detections with every duplicate (as :func:`duplicate_rate` counts them) left
    out, the rest in their order. An analysis tool (it reads the ground truth): the AP of
    the result is what the same model would score if its duplicates alone were gone, the
    most any duplicate removal can leave without better boxes."""
    _, found = _duplicates_by_image(gt_json, detections, score, iou)
    kept = []
    for dets, dups in found.values():
        drop = set(dups)
        kept += [d for i, d in enumerate(dets) if i not in drop]
    return kept
