"""POTO, the prediction-aware one-to-one assignment of DeFCN (Wang et al., "End-to-End
Object Detection with Fully Convolutional Network", CVPR 2021), and its auxiliary
one-to-many assignment.

Per image: quality q = p^(1 - alpha) * IoU^alpha of every (point, gt) pair inside the
centre-sampling prior (the square of half-side ``radius * stride`` around the gt's centre,
clipped to the box, on every level: the prior o2f uses), then the one-to-one matching of
points to gts that maximises the total quality (Hungarian, scipy's
``linear_sum_assignment`` on the block of candidate points x gts with a candidate). Each
matched point is a hard positive (focal loss on p, GIoU with weight 1); all others are
negatives. Unlike the release, a gt with no free candidate gets no positive (the release
then matches it to some point outside the prior).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_iou

from o2f.assign.common import (
    Assignment,
    DensePrediction,
    _background,
    _targets,
    box_distances,
    candidate_pairs,
    paired_box_iou,
)
from o2f.config import ModelConfig

# Added to every candidate's quality in the matching: among matchings of (nearly) equal
# total quality, the one matching more gts wins (a candidate of quality 0, a box not
# overlapping its gt yet, still beats leaving the gt without a positive, as in the release).
_MATCH_BONUS = 1e-9


def poto(points: Tensor, strides: Tensor, scores: Tensor, pred_boxes: Tensor,
         gt_boxes: Tensor, gt_labels: Tensor, *, num_classes: int, alpha: float = 0.8,
         radius: float = 1.5, level_shapes: list[tuple[int, int]] | None = None
         ) -> Assignment:
    """POTO of one image (see the module doc).

    points (N, 2), strides (N,); scores (N, C) the joint score p; pred_boxes (N, 4)
    decoded predictions; gt_boxes (G, 4); gt_labels (G,) int64. Returns at most one
    positive per gt and one gt per point, all inside the prior, with the largest total
    quality; soft labels, weights and box weights 1 at the positives.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    out = _background(num_points, num_classes, pred_boxes)
    out.loss, out.box_weights = "focal", pred_boxes.new_zeros(num_points)
    if num_gts == 0:
        return out
    point_idx, gt_idx = candidate_pairs(points, strides, gt_boxes, radius, level_shapes)
    if point_idx.numel() == 0:
        return out
    iou = paired_box_iou(pred_boxes[point_idx], gt_boxes[gt_idx])
    quality = scores[point_idx, gt_labels[gt_idx]].pow(1 - alpha) * iou.pow(alpha)

    # The candidate block: gts (rows) x points (columns) that hold a candidate pair.
    rows, row = torch.unique(gt_idx, return_inverse=True)
    cols, col = torch.unique(point_idx, return_inverse=True)
    weight = np.zeros((rows.numel(), cols.numel()))
    weight[row.cpu().numpy(), col.cpu().numpy()] = quality.double().cpu().numpy() + _MATCH_BONUS
    r, c = linear_sum_assignment(weight, maximize=True)
    matched = weight[r, c] > 0  # pairs outside the prior only fill the square matching
    pos_gt = rows[torch.as_tensor(r[matched], device=rows.device)]
    pos = cols[torch.as_tensor(c[matched], device=cols.device)]

    _targets(out, points, pos, pos_gt, gt_boxes, gt_labels)
    out.soft_labels[pos] = 1.0
    out.weights[pos] = 1.0
    out.box_weights[pos] = 1.0
    return out


def poto_auxiliary(points: Tensor, cls_prob: Tensor, pred_boxes: Tensor, gt_boxes: Tensor,
                   gt_labels: Tensor, level_shapes: list[tuple[int, int]], *,
                   num_classes: int, alpha: float = 0.8, topk: int = 9) -> Assignment:
    """DeFCN's auxiliary one-to-many assignment (ATSS-like, on the quality) of one image.

    cls_prob (N, C) sigmoid(cls) alone (the auxiliary loss trains the classification
    branch, not the joint score). Per gt: on each level the ``topk`` points of best quality
    q = cls_prob^(1 - alpha) * IoU^alpha are candidates; those with q >= mean + std of the
    gt's candidates' qualities and inside its box are positives; a point positive for
    several gts goes to the one of highest quality. Read by a focal loss on the
    classification logits alone, without box regression.
    """
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    out = _background(num_points, num_classes, pred_boxes)
    out.loss, out.regress = "focal_cls", False
    if num_gts == 0:
        return out
    quality = cls_prob[:, gt_labels].pow(1 - alpha) * box_iou(pred_boxes, gt_boxes).pow(alpha)
    candidates, start = [], 0
    for h, w in level_shapes:
        n = h * w
        candidates.append(quality[start:start + n].topk(min(topk, n), dim=0).indices + start)
        start += n
    candidates = torch.cat(candidates)  # (K, G)
    picked = quality.gather(0, candidates)
    threshold = picked.mean(0) + (picked.std(0) if picked.shape[0] > 1 else 0)
    foreground = torch.zeros_like(quality, dtype=torch.bool).scatter_(0, candidates, True)
    foreground &= (quality >= threshold) & (box_distances(points, gt_boxes).min(-1).values > 0)
    best, gt_index = torch.where(foreground, quality, -1.0).max(1)
    pos = torch.nonzero(best >= 0).squeeze(1)
    _targets(out, points, pos, gt_index[pos], gt_boxes, gt_labels)
    out.soft_labels[pos] = 1.0
    out.weights[pos] = 1.0
    return out


def assign_poto(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor,
                cfg: ModelConfig, *, t: float, soft_anchors: bool = True) -> Assignment:
    """``model.assign=poto``: POTO, plus with ``model.poto_aux`` the auxiliary targets."""
    result = poto(pred.points, pred.strides, pred.scores, pred.boxes, gt_boxes, gt_labels,
                  num_classes=cfg.num_classes, alpha=cfg.alpha, radius=cfg.radius,
                  level_shapes=pred.level_shapes)
    if cfg.poto_aux:
        result.aux = poto_auxiliary(pred.points, torch.sigmoid(pred.cls_logits), pred.boxes,
                                    gt_boxes, gt_labels, pred.level_shapes,
                                    num_classes=cfg.num_classes, alpha=cfg.alpha)
    return result
