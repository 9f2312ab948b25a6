"""Label assignment: one-to-few (the paper's idea), and the o2o / o2m baselines.

Everything here is per image and runs without gradient. Symbols: N points (all FPN levels
concatenated, P3 first), C classes, G ground-truth boxes. Boxes are x1y1x2y2 in input
pixels; regression targets are distances (l, t, r, b) from a point to its box's sides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass
class Assignment:
    """Per-point targets of one image.

    labels (N,) int64: class of each positive point, ``num_classes`` for background.
    box_targets (N, 4): (l, t, r, b) pixels to the assigned box; zeros for background.
    soft_labels (N,): classification target of the positive class; zeros for background.
    weights (N,): weight of that target's loss term; zeros for background.
    gt_index (N,) int64: index of the assigned ground-truth box, -1 for background.
    """

    labels: Tensor
    box_targets: Tensor
    soft_labels: Tensor
    weights: Tensor
    gt_index: Tensor

    @property
    def positive(self) -> Tensor:
        return self.gt_index >= 0


def soft_label_ceiling(epoch: float, num_epochs: int, start: float = 0.6,
                       end: float = 0.2) -> float:
    """The schedule t of the soft anchors' labels: ``start`` at epoch 0, ``end`` at the last.

    t(e) = start + (end - start) * e / (E - 1), with e clamped to [0, E - 1]. Early in
    training soft anchors are mostly positive (they help representation learning); late they
    are mostly negative, which is what teaches the detector to leave out duplicates.
    """
    if num_epochs <= 1:
        return end
    e = min(max(float(epoch), 0.0), num_epochs - 1.0)
    return start + (end - start) * e / (num_epochs - 1)


def _background(num_points: int, num_classes: int, ref: Tensor) -> Assignment:
    return Assignment(
        labels=torch.full((num_points,), num_classes, dtype=torch.int64, device=ref.device),
        box_targets=ref.new_zeros(num_points, 4),
        soft_labels=ref.new_zeros(num_points),
        weights=ref.new_zeros(num_points),
        gt_index=torch.full((num_points,), -1, dtype=torch.int64, device=ref.device))


def box_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """(l, t, r, b) from every point (N, 2) to every box (G, 4): shape (N, G, 4)."""
    x, y = points[:, 0, None], points[:, 1, None]
    return torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)


def candidate_mask(points: Tensor, strides: Tensor, gt_boxes: Tensor, radius: float) -> Tensor:
    """(N, G) bool: point i lies strictly inside gt j's box clipped to the square of half-side
    ``radius * stride_i`` around gt j's centre. Every level may hold candidates."""
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2  # (G, 2)
    half = radius * strides[:, None, None]  # (N, 1, 1)
    lo = torch.maximum(centre - half, gt_boxes[:, :2])  # (N, G, 2)
    hi = torch.minimum(centre + half, gt_boxes[:, 2:])
    p = points[:, None, :]
    return ((p > lo) & (p < hi)).all(-1)


def one_to_few(points: Tensor, strides: Tensor, cls_prob: Tensor, pred_boxes: Tensor,
               gt_boxes: Tensor, gt_labels: Tensor, *, num_classes: int, t: float,
               topk: int = 7, alpha: float = 0.8, radius: float = 1.5,
               soft_weight: float = 0.4) -> Assignment:
    """One-to-few assignment of one image (o2f-spec section 2).

    points (N, 2) and strides (N,) of the cells; cls_prob (N, C) the joint score
    p = sigmoid(cls) * sigmoid(obj); pred_boxes (N, 4) decoded predictions; gt_boxes (G, 4);
    gt_labels (G,) int64. Per gt: one certain positive (label 1, weight 1), up to
    ``topk - 1`` soft anchors (label prob / max prob of the gt's soft anchors * t, weight
    ``soft_weight``), everything else negative. ``topk=1`` is the o2o baseline.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    if num_gts == 0:
        return _background(num_points, num_classes, pred_boxes)

    prob = cls_prob[:, gt_labels]  # (N, G)
    candidate = candidate_mask(points, strides, gt_boxes, radius)
    iou = torch.where(candidate, box_iou(pred_boxes, gt_boxes), 0.0)
    quality = torch.where(candidate, prob.pow(1 - alpha) * iou.pow(alpha), 0.0)

    # Each gt picks its k_j = min(topk, #candidates with IoU > 0) best points by quality.
    k = min(topk, num_points)
    top_quality, top_index = quality.topk(k, dim=0)  # (k, G)
    k_per_gt = (iou > 0).sum(0).clamp(max=topk)  # (G,)
    rank = torch.arange(k, device=quality.device)[:, None]
    keep = (rank < k_per_gt) & (top_quality > 0)
    picks = torch.zeros_like(quality).scatter_(0, top_index, top_quality * keep)

    # A point picked by several gts goes where its quality is highest (ties: lower gt index).
    best_quality, gt_index = picks.max(1)
    gt_index = torch.where(best_quality > 0, gt_index, -1)

    out = _background(num_points, num_classes, pred_boxes)
    pos = torch.nonzero(gt_index >= 0).squeeze(1)
    if pos.numel() == 0:
        return out
    pos_gt, pos_quality = gt_index[pos], best_quality[pos]

    # Order each gt's points by quality (highest first): the first is the certain positive.
    order = torch.sort(pos_quality, descending=True, stable=True).indices
    order = order[torch.sort(pos_gt[order], stable=True).indices]
    pos, pos_gt = pos[order], pos_gt[order]
    certain = torch.ones_like(pos_gt, dtype=torch.bool)
    certain[1:] = pos_gt[1:] != pos_gt[:-1]

    pos_prob = prob[pos, pos_gt]
    soft_prob = torch.where(certain, 0.0, pos_prob)
    max_soft_prob = soft_prob.new_zeros(num_gts).scatter_reduce(
        0, pos_gt, soft_prob, reduce="amax", include_self=True)
    soft = pos_prob / max_soft_prob[pos_gt].clamp(min=torch.finfo(pos_prob.dtype).tiny) * t

    out.gt_index[pos] = pos_gt
    out.labels[pos] = gt_labels[pos_gt]
    out.box_targets[pos] = box_distances(points[pos], gt_boxes)[
        torch.arange(pos.numel(), device=pos.device), pos_gt]
    out.soft_labels[pos] = torch.where(certain, 1.0, soft)
    out.weights[pos] = torch.where(certain, 1.0, soft_weight)
    return out


def level_ranges(strides: Tensor, ranges: tuple[float, ...] = (64, 128, 256, 512)) -> Tensor:
    """FCOS size ranges (N, 2) per point: (-1, 64), (64, 128), ... by level, last to inf."""
    levels = torch.unique(strides, sorted=True)
    bounds = [-1.0, *ranges[: len(levels) - 1], float("inf")]
    level = torch.searchsorted(levels, strides)
    table = strides.new_tensor([[bounds[i], bounds[i + 1]] for i in range(len(levels))])
    return table[level]


def one_to_many(points: Tensor, strides: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *,
                num_classes: int, radius: float = 1.5) -> Assignment:
    """FCOS one-to-many assignment (the o2m baseline, o2f-spec section 6).

    Every point inside a gt's centre region whose largest distance to the box sides lies in
    its level's size range is a hard positive (label 1, weight 1) of the smallest such gt.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    if num_gts == 0:
        return _background(num_points, num_classes, gt_boxes.new_zeros(1))
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
    pos = torch.nonzero(gt_index >= 0).squeeze(1)
    out.gt_index[pos] = gt_index[pos]
    out.labels[pos] = gt_labels[gt_index[pos]]
    out.box_targets[pos] = ltrb[pos, gt_index[pos]]
    out.soft_labels[pos] = 1.0
    out.weights[pos] = 1.0
    return out
