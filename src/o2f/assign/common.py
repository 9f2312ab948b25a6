"""What every assignment rule shares: the result type, the candidate region (the centre
prior), distances and IoUs.

Everything here is per image and runs without gradient. Symbols: N points (all FPN levels
concatenated, P3 first), C classes, G ground-truth boxes. Boxes are x1y1x2y2 in input
pixels; regression targets are distances (l, t, r, b) from a point to its box's sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Assignment:
    """Per-point targets of one image (or of a batch, concatenated: :meth:`cat`).

    labels (N,) int64: class of each positive point, ``num_classes`` for background.
    box_targets (N, 4): (l, t, r, b) pixels to the assigned box; zeros for background.
    soft_labels (N,): classification target of the positive class; zeros for background.
    weights (N,): weight of that target's loss term; zeros for background.
    gt_index (N,) int64: index of the assigned ground-truth box, -1 for background.
    box_weights (N,) or None: weight of each positive's GIoU term (None: the centerness
        of its target, the FCOS / o2f weighting).
    certain (N,) bool or None: o2f's certain positives (None for rules without them).
    loss: which loss reads these targets, a key of :data:`o2f.losses.DENSE_LOSSES`.
    regress: whether the positives also get the box loss.
    aux: a second set of targets trained beside these (POTO's auxiliary one-to-many
        loss on the same outputs; dual's one-to-many branch), or None.
    loss_options: keyword arguments of that loss beyond the targets (e.g. o2f's
        ``rank_weight``), the same for every image of a batch.
    points_per_image: N of one image; set by :meth:`cat` (0 for a single image), so a
        loss can tell the images of a batch apart (``gt_index`` is per image).
    """

    labels: Tensor
    box_targets: Tensor
    soft_labels: Tensor
    weights: Tensor
    gt_index: Tensor
    box_weights: Tensor | None = None
    certain: Tensor | None = None
    loss: str = "soft_focal"
    regress: bool = True
    aux: Assignment | None = None
    loss_options: dict[str, float] = field(default_factory=dict)
    points_per_image: int = 0

    @property
    def positive(self) -> Tensor:
        return self.gt_index >= 0

    @staticmethod
    def cat(assignments: list[Assignment]) -> Assignment:
        """The assignments of a batch's images as one, points concatenated image by image
        (``gt_index`` stays per image). All must share ``loss``; ``aux`` is not carried."""
        first = assignments[0]
        optional = {name: None if getattr(first, name) is None else
                    torch.cat([getattr(a, name) for a in assignments])
                    for name in ("box_weights", "certain")}
        return Assignment(*(torch.cat([getattr(a, f) for a in assignments]) for f in
                            ("labels", "box_targets", "soft_labels", "weights", "gt_index")),
                          **optional, loss=first.loss,
                          regress=first.regress, loss_options=dict(first.loss_options),
                          points_per_image=first.labels.numel())


@dataclass
class DensePrediction:
    """What prediction-aware rules read of one image's dense outputs (detached, float32).

    points (N, 2) pixels and strides (N,) of the cells; level_shapes (H_l, W_l) per level;
    scores (N, C) the joint score p = sigmoid(cls) * sigmoid(obj); boxes (N, 4) decoded
    x1y1x2y2 pixels; cls_logits (N, C) the classification logits alone; one_to_many: the
    same of a head's one-to-many branch (``model.assign=dual``), else None.
    """

    points: Tensor
    strides: Tensor
    level_shapes: list[tuple[int, int]]
    scores: Tensor
    boxes: Tensor
    cls_logits: Tensor
    one_to_many: DensePrediction | None = None


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


def paired_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """(l, t, r, b) from points[i] (P, 2) to boxes[i] (P, 4): shape (P, 4)."""
    return torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], 1)


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


def centerness(ltrb: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of targets (P, 4)."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    ratio = (lr.min(1).values / lr.max(1).values.clamp(min=1e-12)) * (
        tb.min(1).values / tb.max(1).values.clamp(min=1e-12))
    return ratio.clamp(min=0).sqrt()


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


def _group_max(group: Tensor, value: Tensor, num_groups: int) -> Tensor:
    """(num_groups,) the largest non-negative ``value`` of each group (0 for an empty one).
    group and value (P,)."""
    return value.new_zeros(num_groups).scatter_reduce(0, group, value, "amax")


def _top_per_group(group: Tensor, value: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest ``value`` entries of each group with value > 0, by
    group, best first (ties keep index order). group and value (P,)."""
    order = _sort_groups(group, value)
    first = _first_in_group(group[order])
    position = torch.arange(order.numel(), device=order.device)
    rank = position - torch.cummax(torch.where(first, position, 0), 0).values
    return order[(rank < k) & (value[order] > 0)]


def _targets(out: Assignment, points: Tensor, pos: Tensor, pos_gt: Tensor, gt_boxes: Tensor,
             gt_labels: Tensor) -> None:
    """Fill class, gt index and (l, t, r, b) targets of the positive points ``pos`` (P,)
    assigned to gts ``pos_gt`` (P,), in place."""
    box, p = gt_boxes[pos_gt], points[pos]
    out.gt_index[pos] = pos_gt
    out.labels[pos] = gt_labels[pos_gt]
    out.box_targets[pos] = paired_distances(p, box)
