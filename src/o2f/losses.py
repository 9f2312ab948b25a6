"""Losses of docs/algorithm.md section 3, computed in float32 whatever the autocast dtype."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from o2f.assign.common import centerness

if TYPE_CHECKING:
    from o2f.assign import Assignment


def reduce_mean(x: Tensor) -> Tensor:
    """Mean of a tensor over all processes (itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def joint_log_probs(cls_logits: Tensor, obj_logits: Tensor) -> tuple[Tensor, Tensor]:
    """log p and log(1 - p) for p = sigmoid(cls) * sigmoid(obj), without forming p.

    cls_logits (N, C), obj_logits (N,) or (N, 1). p underflows easily in half precision (a
    product of two small sigmoids), so both logs are computed from the logits:
      log p     = -softplus(-a) - softplus(-b)
      log(1-p)  = log(e^-a + e^-b + e^-(a+b)) - softplus(-a) - softplus(-b)
    """
    a = cls_logits.float()
    b = obj_logits.float().reshape(-1, 1).expand_as(a)
    log_norm = F.softplus(-a) + F.softplus(-b)
    log_p = -log_norm
    log_1mp = torch.logsumexp(torch.stack([-a, -b, -a - b]), 0) - log_norm
    return log_p, log_1mp


def soft_focal_loss(cls_logits: Tensor, obj_logits: Tensor, labels: Tensor, soft_labels: Tensor,
                    weights: Tensor, valid: Tensor | None = None, *,
                    push_obj_only: bool = False) -> Tensor:
    """Un-normalised soft focal loss over all N x C entries of the joint score p.

    cls_logits (N, C), obj_logits (N,) or (N, 1); labels (N,) int64 with C for background;
    soft_labels (N,) and weights (N,) as returned by :func:`o2f.assign.one_to_few`; valid
    (N,) bool leaves points out of the loss (ignore regions), default all in.

    Every entry is a negative, 0.75 * p^2 * BCE(p, 0), except a positive point's entry at
    its class, which is w * BCE(p, s). The caller divides by the number of positive points.
    ``push_obj_only`` (``model.soft_push=obj``): the part of a positive's term that pushes p
    down, -(1 - s) log(1 - p), reaches the objectness logit only (the classification logit
    is held), so soft anchors are suppressed through the objectness while their class score
    keeps its positive training.
    """
    num_classes = cls_logits.shape[1]
    log_p, log_1mp = joint_log_probs(cls_logits, obj_logits)
    negative = 0.75 * torch.exp(2 * log_p) * -log_1mp  # (N, C)
    pos = torch.nonzero(labels < num_classes).squeeze(1)
    cls = labels[pos]
    s, w = soft_labels[pos].float(), weights[pos].float()
    if push_obj_only:
        log_1mp_pos = joint_log_probs(cls_logits[pos, cls].detach()[:, None],
                                      obj_logits.reshape(-1)[pos])[1][:, 0]
    else:
        log_1mp_pos = log_1mp[pos, cls]
    positive = -(s * log_p[pos, cls] + (1 - s) * log_1mp_pos) * w
    negative = negative.index_put((pos, cls), positive)
    if valid is not None:
        negative = negative * valid.reshape(-1, 1)
    return negative.sum()


def weighted_giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i * GIoU-loss_i / max(mean over processes of sum w, 1e-6); boxes (P, 4)."""
    loss = generalized_box_iou_loss(pred_boxes.float(), target_boxes.float(), reduction="none")
    denom = reduce_mean(weights.sum().detach()).clamp(min=1e-6)
    return (loss * weights).sum() / denom


def focal_loss(cls_logits: Tensor, labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """FCOS's sigmoid focal loss (alpha 0.25, gamma 2), summed: the o2m baseline."""
    num_classes = cls_logits.shape[1]
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(torch.float32)
    loss = sigmoid_focal_loss(cls_logits.float(), onehot, alpha=0.25, gamma=2.0, reduction="none")
    if valid is not None:
        loss = loss * valid.reshape(-1, 1)
    return loss.sum()


def dice_loss(probs: Tensor, targets: Tensor, eps: float = 1e-5) -> Tensor:
    """Dice loss of each mask, as CondInst: 1 - 2 * sum(p * g) / (sum(p^2) + sum(g^2) + eps).

    probs (P, ...) predicted probabilities in [0, 1]; targets (P, ...) the same shape, in
    [0, 1] (binary, or area fractions). Sums run over all but the first dimension. Returns
    (P,) float32; 0 for a perfect mask, 1 when they do not overlap (eps keeps an empty
    prediction of an empty target finite: 1).
    """
    p = probs.float().flatten(1)
    g = targets.float().flatten(1)
    return 1 - 2 * (p * g).sum(1) / ((p * p).sum(1) + (g * g).sum(1) + eps)


def joint_focal_loss(cls_logits: Tensor, obj_logits: Tensor, labels: Tensor,
                     valid: Tensor | None = None, alpha: float = 0.25,
                     gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (alpha 0.25, gamma 2) on the joint score p = sigmoid(cls) *
    sigmoid(obj), summed over all N x C entries: DeFCN's loss on its filtered score.
    cls_logits (N, C), obj_logits (N,); labels (N,) int64 with C for background."""
    num_classes = cls_logits.shape[1]
    log_p, log_1mp = joint_log_probs(cls_logits, obj_logits)
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(torch.float32)
    p = torch.exp(log_p)
    loss = torch.where(target > 0, -alpha * (1 - p).pow(gamma) * log_p,
                       -(1 - alpha) * p.pow(gamma) * log_1mp)
    if valid is not None:
        loss = loss * valid.reshape(-1, 1)
    return loss.sum()


def joint_bce_loss(cls_logits: Tensor, obj_logits: Tensor, labels: Tensor,
                   soft_labels: Tensor, valid: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of the joint score p against soft targets, summed over all
    N x C entries: target ``soft_labels[i]`` at a positive point's class, 0 elsewhere (the
    YOLOv8 / v10 classification loss with task-aligned targets)."""
    num_classes = cls_logits.shape[1]
    log_p, log_1mp = joint_log_probs(cls_logits, obj_logits)
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(torch.float32)
    target = target * soft_labels.float().reshape(-1, 1)
    loss = -(target * log_p + (1 - target) * log_1mp)
    if valid is not None:
        loss = loss * valid.reshape(-1, 1)
    return loss.sum()


def _num_positives(a: Assignment, num_classes: int) -> Tensor:
    count = (a.labels < num_classes).sum().to(torch.float32)
    return reduce_mean(count).clamp(min=1)


def certain_rank_loss(cls_logits: Tensor, obj_logits: Tensor, a: Assignment) -> Tensor:
    """Per gt, the cross-entropy of a softmax over its positives' joint log-scores, with the
    certain positive as the answer; the mean over gts (``model.rank_weight``).

    For a gt with certain positive c and soft anchors j:
      loss = -log(p_c / (p_c + sum_j p_j)) = logsumexp(log p_c, log p_j...) - log p_c.
    Its gradient raises log p_c by (1 - q_c) and lowers each log p_j by q_j (q = p / sum p),
    so it moves the scores apart without moving their level: it sharpens the group's peak
    rather than pushing the whole group down. A gt with no soft anchor adds 0. The certain
    positives are ``a.certain`` (:func:`o2f.assign.one_to_few`), or, in an assignment that
    does not mark them, the positives labelled 1.
    """
    num_classes = cls_logits.shape[1]
    pos = torch.nonzero(a.labels < num_classes).squeeze(1)
    if pos.numel() == 0:
        return cls_logits.sum() * 0.0
    log_p = -(F.softplus(-cls_logits[pos, a.labels[pos]].float())
              + F.softplus(-obj_logits.reshape(-1)[pos].float()))
    image = pos // a.points_per_image if a.points_per_image else torch.zeros_like(pos)
    group = torch.unique(image * (int(a.gt_index.max()) + 1) + a.gt_index[pos],
                         return_inverse=True)[1]
    num_groups = int(group.max()) + 1
    peak = log_p.new_full((num_groups,), -torch.inf).scatter_reduce(
        0, group, log_p.detach(), "amax")
    total = log_p.new_zeros(num_groups).index_add(0, group, torch.exp(log_p - peak[group]))
    log_total = peak + torch.log(total)
    certain = (a.soft_labels == 1 if a.certain is None else a.certain)[pos]
    loss = (log_total[group[certain]] - log_p[certain]).sum()
    return loss / reduce_mean(log_p.new_tensor(float(num_groups))).clamp(min=1)


def soft_focal_objective(cls_logits: Tensor, obj_logits: Tensor, a: Assignment,
                         valid: Tensor | None, *, push_obj_only: bool = False,
                         rank_weight: float = 0.0) -> dict[str, Tensor]:
    """o2f / o2o: the soft focal loss on p per positive point (``push_obj_only``:
    ``model.soft_push=obj``, see :func:`soft_focal_loss`); with ``rank_weight`` > 0 also
    ``loss_rank``, that weight times :func:`certain_rank_loss`."""
    num_classes = cls_logits.shape[1]
    loss = soft_focal_loss(cls_logits, obj_logits, a.labels, a.soft_labels, a.weights, valid,
                           push_obj_only=push_obj_only)
    losses = {"loss_cls": loss / _num_positives(a, num_classes)}
    if rank_weight > 0:
        losses["loss_rank"] = rank_weight * certain_rank_loss(cls_logits, obj_logits, a)
    return losses


def fcos_objective(cls_logits: Tensor, obj_logits: Tensor, a: Assignment,
                   valid: Tensor | None) -> dict[str, Tensor]:
    """o2m: FCOS's focal loss on the classification logits, and BCE of the objectness
    (FCOS's centerness branch) against the positives' centerness, per positive point."""
    num_classes = cls_logits.shape[1]
    num_pos = _num_positives(a, num_classes)
    pos = torch.nonzero(a.labels < num_classes).squeeze(1)
    losses = {"loss_cls": focal_loss(cls_logits, a.labels, valid) / num_pos}
    if pos.numel() > 0:
        losses["loss_obj"] = F.binary_cross_entropy_with_logits(
            obj_logits[pos].float(), centerness(a.box_targets[pos]), reduction="sum") / num_pos
    else:
        losses["loss_obj"] = obj_logits.sum() * 0.0
    return losses


def joint_focal_objective(cls_logits: Tensor, obj_logits: Tensor, a: Assignment,
                          valid: Tensor | None) -> dict[str, Tensor]:
    """POTO: focal loss on the joint score p, per positive point."""
    num_classes = cls_logits.shape[1]
    loss = joint_focal_loss(cls_logits, obj_logits, a.labels, valid)
    return {"loss_cls": loss / _num_positives(a, num_classes)}


def cls_focal_objective(cls_logits: Tensor, obj_logits: Tensor, a: Assignment,
                        valid: Tensor | None) -> dict[str, Tensor]:
    """POTO's auxiliary loss: focal loss on the classification logits alone."""
    num_classes = cls_logits.shape[1]
    return {"loss_cls": focal_loss(cls_logits, a.labels, valid) / _num_positives(a, num_classes)}


def joint_bce_objective(cls_logits: Tensor, obj_logits: Tensor, a: Assignment,
                        valid: Tensor | None) -> dict[str, Tensor]:
    """dual: BCE of p against the task-aligned targets, per unit of target (their sum)."""
    loss = joint_bce_loss(cls_logits, obj_logits, a.labels, a.soft_labels, valid)
    norm = reduce_mean(a.soft_labels.sum().float().detach()).clamp(min=1)
    return {"loss_cls": loss / norm}


# The classification objectives, by the name an Assignment carries (``Assignment.loss``):
# (cls_logits (N, C), obj_logits (N,), the batch's Assignment, valid (N,) or None) -> the
# normalised losses. The box loss (GIoU) is the detector's, the same for all.
DENSE_LOSSES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "soft_focal": soft_focal_objective,
    "soft_focal_obj": partial(soft_focal_objective, push_obj_only=True),
    "fcos": fcos_objective,
    "focal": joint_focal_objective,
    "focal_cls": cls_focal_objective,
    "bce": joint_bce_objective,
}
