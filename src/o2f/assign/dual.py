"""YOLOv10's consistent dual assignment (Wang et al., "YOLOv10: Real-Time End-to-End Object
Detection", 2024) on the o2f head.

Two branches of the head are trained together: a one-to-many branch (a second set of
classification / regression / objectness convs, training only) and the one-to-one branch
that alone runs at inference and is exported. Both are assigned by the same task-aligned
metric m = s^alpha * IoU^beta (alpha 0.5, beta 6) between a point's predicted box and
score s of the gt's class and the gt, over the points inside the gt box: the top 10 per gt
for the one-to-many branch, the top 1 for the one-to-one branch ("consistent": the o2o
positive is the best o2m positive). A point picked by several gts goes to the one its box
overlaps most. The classification target of a positive is its metric normalised per gt,
m * (largest IoU among the gt's positives) / (largest m among them); a BCE on the joint
score reads it (normalised by the sum of targets) and weighs the GIoU term by it.

As in the release, the one-to-one branch reads detached FPN features: the backbone and
neck learn from the one-to-many branch only. Loss gains are the project's (classification
1, GIoU ``reg_weight``) rather than Ultralytics' (0.5 and 7.5 with a CIoU + DFL box loss the
o2f head does not have).
"""

from __future__ import annotations

import torch
from torch import Tensor

from o2f.assign.common import (
    Assignment,
    DensePrediction,
    _background,
    _first_in_group,
    _group_max,
    _sort_groups,
    _targets,
    _top_per_group,
    box_distances,
    paired_box_iou,
)
from o2f.config import ModelConfig


def task_aligned(points: Tensor, scores: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
                 gt_labels: Tensor, *, num_classes: int, topk: int, alpha: float = 0.5,
                 beta: float = 6.0) -> Assignment:
    """Task-aligned assignment of one image (see the module doc).

    points (N, 2); scores (N, C) the joint score p; pred_boxes (N, 4) decoded; gt_boxes
    (G, 4); gt_labels (G,) int64. Per gt its ``topk`` points of largest metric
    m = p^alpha * IoU^beta among those strictly inside its box (and m > 0). soft_labels and
    box_weights are the normalised metric; weights 1.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    out = _background(num_points, num_classes, pred_boxes)
    out.loss, out.box_weights = "bce", pred_boxes.new_zeros(num_points)
    if num_gts == 0:
        return out
    point_idx, gt_idx = torch.nonzero(box_distances(points, gt_boxes).min(-1).values > 0,
                                      as_tuple=True)
    iou = paired_box_iou(pred_boxes[point_idx], gt_boxes[gt_idx])
    metric = scores[point_idx, gt_labels[gt_idx]].pow(alpha) * iou.pow(beta)

    picked = _top_per_group(gt_idx, metric, topk)
    # A point picked by several gts: the one its box overlaps most (ties: lower gt index).
    picked = picked[_sort_groups(point_idx[picked], iou[picked])]
    won = picked[_first_in_group(point_idx[picked])]
    pos, pos_gt = point_idx[won], gt_idx[won]

    best_iou = _group_max(pos_gt, iou[won], num_gts)
    best_metric = _group_max(pos_gt, metric[won], num_gts)
    target = metric[won] * best_iou[pos_gt] / best_metric[pos_gt].clamp(min=1e-9)
    _targets(out, points, pos, pos_gt, gt_boxes, gt_labels)
    out.soft_labels[pos] = target
    out.weights[pos] = 1.0
    out.box_weights[pos] = target
    return out


def assign_dual(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor,
                cfg: ModelConfig, *, t: float, soft_anchors: bool = True) -> Assignment:
    """``model.assign=dual``: the one-to-one branch's targets (top 1), with the one-to-many
    branch's (top 10, on that branch's own predictions) as ``aux`` when its outputs are
    there (training; an eval-mode forward runs the one-to-one branch only)."""
    result = task_aligned(pred.points, pred.scores, pred.boxes, gt_boxes, gt_labels,
                          num_classes=cfg.num_classes, topk=1)
    o2m = pred.one_to_many
    if o2m is not None:
        result.aux = task_aligned(o2m.points, o2m.scores, o2m.boxes, gt_boxes, gt_labels,
                                  num_classes=cfg.num_classes, topk=10)
    return result
