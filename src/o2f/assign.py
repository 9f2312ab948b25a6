"""Label assignment: one-to-few (the paper's idea), and the o2o / o2m baselines.

Everything here is per image and runs without gradient. Symbols: N points (all FPN levels
concatenated, P3 first), C classes, G ground-truth boxes. Boxes are x1y1x2y2 in input
pixels; regression targets are distances (l, t, r, b) from a point to its box's sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


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


def soft_label_ceiling_by_iter(progress: float, start: float = 0.6, end: float = 0.2,
                               end_at: float = 1.0) -> float:
    """The ceiling t as a function of training progress (iterations done / all iterations).

    t falls linearly from ``start`` at progress 0 to ``end`` at progress ``end_at`` and holds
    there: with ``end_at < 1`` the last ``1 - end_at`` of training (the duplicate-removal
    phase) still has learning rate to spend at the final t. ``end_at = 1`` is the release's
    linear fall, continuous in the iteration instead of stepping once per epoch.
    """
    if end_at <= 0:
        return end
    return start + (end - start) * min(max(float(progress), 0.0) / end_at, 1.0)


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


def candidate_pairs(points: Tensor, strides: Tensor, gt_boxes: Tensor, radius: float,
                    level_shapes: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
    """The (point, gt) candidate pairs of :func:`candidate_mask`, as two index vectors (P,).

    Without ``level_shapes`` this is ``candidate_mask(...).nonzero()``: N x G work. With the
    feature-map shapes of the levels (points laid out as :func:`o2f.model.head.make_points`
    does), only a window of cells around each gt's centre is tested: the centre square has
    half-side ``radius * stride``, so it spans at most 2 * ceil(radius + 0.5) + 1 cells a
    side on every level, whatever the image size. Same pairs, O(G) work.
    """
    if level_shapes is None:
        pairs = candidate_mask(points, strides, gt_boxes, radius).nonzero()
        return pairs[:, 0], pairs[:, 1]
    reach = math.ceil(radius + 0.5)
    offsets = torch.arange(-reach, reach + 1, device=points.device)
    dy, dx = (o.reshape(-1) for o in torch.meshgrid(offsets, offsets, indexing="ij"))
    centre = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    windows, start = [], 0
    for h, w in level_shapes:
        stride = strides[start]
        cell = torch.floor(centre / stride).long()  # (G, 2) cell holding the centre
        x, y = cell[:, :1] + dx, cell[:, 1:] + dy  # (G, W)
        inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
        windows.append(torch.where(inside, start + y * w + x, -1))
        start += h * w
    index = torch.cat(windows, 1)  # (G, window cells over all levels), -1 outside the map
    gt_idx, slot = torch.nonzero(index >= 0, as_tuple=True)
    point_idx = index[gt_idx, slot]
    p, box = points[point_idx], gt_boxes[gt_idx]
    half = radius * strides[point_idx, None]
    lo = torch.maximum(centre[gt_idx] - half, box[:, :2])
    hi = torch.minimum(centre[gt_idx] + half, box[:, 2:])
    keep = ((p > lo) & (p < hi)).all(1)
    point_idx, gt_idx = point_idx[keep], gt_idx[keep]
    order = torch.argsort(point_idx * gt_boxes.shape[0] + gt_idx)  # the nonzero() order
    return point_idx[order], gt_idx[order]


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of boxes1[i] with boxes2[i]: (P, 4) x (P, 4) -> (P,)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(boxes1.dtype).eps)


def _sort_groups(group: Tensor, value: Tensor) -> Tensor:
    """Order by group ascending, then value descending; ties keep their current order."""
    order = torch.sort(value, descending=True, stable=True).indices
    return order[torch.sort(group[order], stable=True).indices]


def _first_in_group(sorted_group: Tensor) -> Tensor:
    first = torch.ones_like(sorted_group, dtype=torch.bool)
    first[1:] = sorted_group[1:] != sorted_group[:-1]
    return first


def one_to_few(points: Tensor, strides: Tensor, cls_prob: Tensor, pred_boxes: Tensor,
               gt_boxes: Tensor, gt_labels: Tensor, *, num_classes: int, t: float,
               topk: int = 7, alpha: float = 0.8, radius: float = 1.5,
               soft_weight: float = 0.4,
               level_shapes: list[tuple[int, int]] | None = None) -> Assignment:
    """One-to-few assignment of one image (docs/algorithm.md section 2).

    points (N, 2) and strides (N,) of the cells; cls_prob (N, C) the joint score
    p = sigmoid(cls) * sigmoid(obj); pred_boxes (N, 4) decoded predictions; gt_boxes (G, 4);
    gt_labels (G,) int64. Per gt: one certain positive (label 1, weight 1), up to
    ``topk - 1`` soft anchors (label prob / max prob of the gt's soft anchors * t, weight
    ``soft_weight``), everything else negative. ``topk=1`` is the o2o baseline.
    ``level_shapes`` (optional, the feature-map sizes behind ``points``) makes the
    candidate search O(G) instead of O(N x G); the result is the same.

    Only (point, gt) candidate pairs are ever formed: quality and IoU are 0 elsewhere.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    out = _background(num_points, num_classes, pred_boxes)
    if num_gts == 0:
        return out

    # 1-3. Candidate pairs and their quality prob^(1 - alpha) * IoU^alpha.
    point_idx, gt_idx = candidate_pairs(points, strides, gt_boxes, radius, level_shapes)
    iou = paired_box_iou(pred_boxes[point_idx], gt_boxes[gt_idx])
    prob = cls_prob[point_idx, gt_labels[gt_idx]]
    quality = prob.pow(1 - alpha) * iou.pow(alpha)

    # 4. Each gt picks its k_j = min(topk, #candidates with IoU > 0) best pairs by quality.
    k_per_gt = torch.bincount(gt_idx[iou > 0], minlength=num_gts).clamp(max=topk)
    order = _sort_groups(gt_idx, quality)
    first = _first_in_group(gt_idx[order])
    position = torch.arange(order.numel(), device=order.device)
    rank = position - torch.cummax(torch.where(first, position, 0), 0).values
    picked = order[(rank < k_per_gt[gt_idx[order]]) & (quality[order] > 0)]

    # 5. A point picked by several gts goes where its quality is highest; exact ties go to
    # the lower gt index (picked is ordered by gt, and the sorts below are stable).
    picked = picked[torch.sort(quality[picked], descending=True, stable=True).indices]
    picked = picked[torch.sort(point_idx[picked], stable=True).indices]
    won = picked[_first_in_group(point_idx[picked])]

    # 6. Per gt, best quality first: the certain positive, then the soft anchors.
    won = won[_sort_groups(gt_idx[won], quality[won])]
    pos, pos_gt, pos_prob = point_idx[won], gt_idx[won], prob[won]
    certain = _first_in_group(pos_gt)
    soft_prob = torch.where(certain, 0.0, pos_prob)
    max_soft_prob = soft_prob.new_zeros(num_gts).scatter_reduce(0, pos_gt, soft_prob, "amax")
    soft = pos_prob / max_soft_prob[pos_gt].clamp(min=torch.finfo(pos_prob.dtype).tiny) * t

    # 7. Class and (l, t, r, b) regression target of every positive.
    box = gt_boxes[pos_gt]
    p = points[pos]
    out.gt_index[pos] = pos_gt
    out.labels[pos] = gt_labels[pos_gt]
    out.box_targets[pos] = torch.cat([p - box[:, :2], box[:, 2:] - p], 1)
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
    """FCOS one-to-many assignment (the o2m baseline, docs/algorithm.md section 6).

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
