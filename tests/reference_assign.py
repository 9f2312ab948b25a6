"""A straightforward per-gt loop implementation of the one-to-few assignment.

Written for comparison only (tests and the assigner benchmark): it follows docs/algorithm.md
section 2 line by line, one ground-truth box at a time.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou


def one_to_few_loop(points, strides, cls_prob, pred_boxes, gt_boxes, gt_labels, *,
                    num_classes, t, topk=7, alpha=0.8, radius=1.5, soft_weight=0.4):
    n, g = points.shape[0], gt_boxes.shape[0]
    labels = torch.full((n,), num_classes, dtype=torch.int64)
    box_targets = torch.zeros(n, 4)
    soft_labels = torch.zeros(n)
    weights = torch.zeros(n)
    gt_index = torch.full((n,), -1, dtype=torch.int64)
    if g == 0:
        return labels, box_targets, soft_labels, weights, gt_index
    iou_all = box_iou(pred_boxes, gt_boxes)
    picks = torch.zeros(n, g)
    quality = torch.zeros(n, g)
    for j in range(g):
        x1, y1, x2, y2 = gt_boxes[j].tolist()
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = radius * strides
        inside = ((points[:, 0] > torch.clamp(cx - half, min=x1))
                  & (points[:, 0] < torch.clamp(cx + half, max=x2))
                  & (points[:, 1] > torch.clamp(cy - half, min=y1))
                  & (points[:, 1] < torch.clamp(cy + half, max=y2)))
        prob = cls_prob[:, gt_labels[j]]
        iou = torch.where(inside, iou_all[:, j], 0.0)
        q = torch.where(inside, prob ** (1 - alpha) * iou ** alpha, 0.0)
        quality[:, j] = q
        k = min(topk, int((iou > 0).sum()))
        if k == 0:
            continue
        val, idx = q.topk(k)
        for v, i in zip(val.tolist(), idx.tolist(), strict=True):
            if v > 0:
                picks[i, j] = v
    for i in range(n):
        best = -1
        for j in range(g):
            if picks[i, j] > 0 and (best < 0 or picks[i, j] > picks[i, best]):
                best = j
        gt_index[i] = best
    for j in range(g):
        mine = [i for i in range(n) if gt_index[i] == j]
        if not mine:
            continue
        mine.sort(key=lambda i: -float(quality[i, j]))
        soft = mine[1:]
        max_prob = max((float(cls_prob[i, gt_labels[j]]) for i in soft), default=1.0)
        for rank, i in enumerate(mine):
            labels[i] = gt_labels[j]
            x1, y1, x2, y2 = gt_boxes[j].tolist()
            px, py = points[i].tolist()
            box_targets[i] = torch.tensor([px - x1, py - y1, x2 - px, y2 - py])
            if rank == 0:
                soft_labels[i], weights[i] = 1.0, 1.0
            else:
                soft_labels[i] = float(cls_prob[i, gt_labels[j]]) / max_prob * t
                weights[i] = soft_weight
    return labels, box_targets, soft_labels, weights, gt_index
