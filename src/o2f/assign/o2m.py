"""FCOS one-to-many assignment: the o2m baseline (evaluated with and without NMS)."""

from __future__ import annotations

import torch
from torch import Tensor

from o2f.assign.common import (
    Assignment,
    DensePrediction,
    _background,
    box_distances,
    candidate_mask,
)
from o2f.config import ModelConfig


def level_ranges(strides: Tensor, ranges: tuple[float, ...] = (64, 128, 256, 512)) -> Tensor:
    """FCOS size ranges (N, 2) per point: (-1, 64), (64, 128), ... by level, last to inf."""
    levels = torch.unique(strides, sorted=True)
    bounds = [-1.0, *ranges[: len(levels) - 1], float("inf")]
    level = torch.searchsorted(levels, strides)
    table = strides.new_tensor([[bounds[i], bounds[i + 1]] for i in range(len(levels))])
    return table[level]


def one_to_many(points: Tensor, strides: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *,
                num_classes: int, radius: float = 1.5) -> Assignment:
    """FCOS one-to-many assignment (the o2m baseline, docs/algorithm.md section 6).

    Every point inside a gt's centre region whose largest distance to the box sides lies in
    its level's size range is a hard positive (label 1, weight 1) of the smallest such gt.
    Read by FCOS's losses (``loss="fcos"``): focal on the classification logits, and the
    objectness branch learns the centerness of the positives.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    if num_gts == 0:
        out = _background(num_points, num_classes, gt_boxes.new_zeros(1))
        out.loss = "fcos"
        return out
    ltrb = box_distances(points, gt_boxes)  # (N, G, 4)
    reach = ltrb.max(-1).values
    bounds = level_ranges(strides)
    ok = candidate_mask(points, strides, gt_boxes, radius) & (reach >= bounds[:, :1]) & (
        reach <= bounds[:, 1:])
    area = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    area = torch.where(ok, area, float("inf"))
    min_area, gt_index = area.min(1)
    gt_index = torch.where(torch.isfinite(min_area), gt_index, -1)

    out = _background(num_points, num_classes, gt_boxes)
    out.loss = "fcos"
    pos = torch.nonzero(gt_index >= 0).squeeze(1)
    out.gt_index[pos] = gt_index[pos]
    out.labels[pos] = gt_labels[gt_index[pos]]
    out.box_targets[pos] = ltrb[pos, gt_index[pos]]
    out.soft_labels[pos] = 1.0
    out.weights[pos] = 1.0
    return out



def assign_o2m(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor, cfg: ModelConfig,
               *, t: float, soft_anchors: bool = True) -> Assignment:
    """``model.assign=o2m``: FCOS (reads no prediction)."""
    return one_to_many(pred.points, pred.strides, gt_boxes, gt_labels,
                       num_classes=cfg.num_classes, radius=cfg.radius)
