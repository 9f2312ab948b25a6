"""One-to-few assignment (the paper's rule, docs/algorithm.md section 2) and its
soft-label ceiling t. ``topk=1`` is the o2o baseline."""

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
    candidate_pairs,
    centerness,
    paired_box_iou,
    paired_distances,
)
from o2f.config import RECIPES, ModelConfig


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


def _share_of_fall(t: float, cfg: ModelConfig) -> float:
    """How far t has fallen from ``t_start`` towards ``t_end``: 0 at the start, 1 at the
    end, clamped to [0, 1] outside (1 when t does not fall)."""
    if cfg.t_start == cfg.t_end:
        return 1.0
    return min(max((cfg.t_start - t) / (cfg.t_start - cfg.t_end), 0.0), 1.0)


def soft_weight_at(t: float, cfg: ModelConfig) -> float:
    """The soft anchors' loss weight when the ceiling is ``t``: ``model.soft_weight``
    throughout (the release), or, with ``model.soft_weight_end`` set, moving with t from
    ``soft_weight`` at ``t_start`` to ``soft_weight_end`` at ``t_end`` (linear in t, held
    outside). A heavier weight at the end pushes harder on soft anchors as negatives.
    ``model.soft_weight_from=s`` holds the weight until t has made the share s of its fall,
    then moves it over the rest (s = 0: over the whole fall)."""
    if cfg.soft_weight_end is None or cfg.t_start == cfg.t_end:
        return cfg.soft_weight
    if not 0.0 <= cfg.soft_weight_from < 1.0:
        raise ValueError(f"model.soft_weight_from must be in [0, 1), got {cfg.soft_weight_from}")
    f = _share_of_fall(t, cfg)
    f = max(f - cfg.soft_weight_from, 0.0) / (1.0 - cfg.soft_weight_from)
    return cfg.soft_weight + (cfg.soft_weight_end - cfg.soft_weight) * f


def rank_weight_at(t: float, cfg: ModelConfig) -> float:
    """The weight of the certain-positive ranking loss (``model.rank_weight``,
    :func:`o2f.losses.certain_rank_loss`) when the ceiling is ``t``: 0 at ``t_start``,
    growing with t's fall to ``rank_weight`` at ``t_end`` (held outside), so the soft
    anchors are ranked below their certain positive as they turn from positives into
    negatives. With a constant t it is ``rank_weight`` throughout."""
    if cfg.rank_weight < 0:
        raise ValueError(f"model.rank_weight must be >= 0, got {cfg.rank_weight}")
    return cfg.rank_weight * _share_of_fall(t, cfg)


def one_to_few(points: Tensor, strides: Tensor, cls_prob: Tensor, pred_boxes: Tensor,
               gt_boxes: Tensor, gt_labels: Tensor, *, num_classes: int, t: float,
               topk: int = 7, alpha: float = 0.8, radius: float = 1.5,
               soft_weight: float = 0.4, certain_by: str = "quality",
               certain_weight: float = 1.0, certain_label: str = "one",
               top_soft_weight: float | None = None, certain_margin: float = 0.05,
               soft_cap: float | None = None, below_cap_weight: float = 0.4,
               level_shapes: list[tuple[int, int]] | None = None) -> Assignment:
    """One-to-few assignment of one image (docs/algorithm.md section 2).

    points (N, 2) and strides (N,) of the cells; cls_prob (N, C) the joint score
    p = sigmoid(cls) * sigmoid(obj); pred_boxes (N, 4) decoded predictions; gt_boxes (G, 4);
    gt_labels (G,) int64. Per gt: one certain positive (label 1, weight 1), up to
    ``topk - 1`` soft anchors (label prob / max prob of the gt's soft anchors * t, weight
    ``soft_weight``), everything else negative. ``topk=1`` is the o2o baseline.
    ``level_shapes`` (optional, the feature-map sizes behind ``points``) makes the
    candidate search O(G) instead of O(N x G); the result is the same.
    ``certain_weight`` (beyond the release, which has 1) weighs each certain positive's
    term; ``certain_label="iou"`` makes its label the IoU of its predicted box with the gt
    (the release: 1), so the scores of the objects' peaks rank them by how well they are
    boxed. ``top_soft_weight`` (beyond the release: None, every soft anchor weighs
    ``soft_weight``) is the weight of a soft anchor that outscores every other pick of its
    gt, the certain positive included: where two cells trade the certain role, the one the
    network already ranks first is spared the soft anchors' push while the other takes it,
    so the peak stays high and its neighbour goes down. ``soft_cap`` (beyond the release:
    None) gives ``soft_weight`` only to the soft anchors scoring at least the cap and
    ``below_cap_weight`` to the others: a heavy push on the neighbours that would show as a
    second detection of their object, none beyond the release's on those already under
    it. ``certain_by`` (options beyond the
    release; picks and soft labels are unchanged) picks each gt's certain positive by
    quality x the centerness of the point in the gt box (``"centred"``), or on the level of
    the best-quality pick, the cell nearest the centre (``"centred_in_level"``), instead of
    by quality alone: of two neighbouring cells of about equal quality the one nearer the
    centre wins, a rule the network can see in its input. ``"score"`` picks the one the
    network already scores highest: of two near-equal neighbours the leader stays certain
    and the other is pushed down, so the pair stops trading the role from one iteration to
    the next. ``"iou"`` picks the best predicted box (quality with alpha = 1), so the score
    would follow the box rather than keep the role with the cell that already scores;
    measured, it lets the role change between cells of near-equal boxes every iteration and
    no single peak forms (docs/ablation.md). ``"leader"`` joins quality and score: of the
    picks whose quality is within ``certain_margin`` of the gt's best, the one the network
    scores highest, so neighbours of near-equal quality stop trading the role while the
    certain positive's quality stays within the margin of the release's choice.

    Only (point, gt) candidate pairs are ever formed: quality and IoU are 0 elsewhere.
    """
    if certain_label not in ("one", "iou"):
        raise ValueError(f"model.certain_label must be one or iou, got {certain_label!r}")
    num_points, num_gts = points.shape[0], gt_boxes.shape[0]
    out = _background(num_points, num_classes, pred_boxes)
    out.certain = torch.zeros(num_points, dtype=torch.bool, device=pred_boxes.device)
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
    key = quality[won]
    if certain_by in ("centred", "centred_in_level"):
        centred = centerness(paired_distances(points[point_idx[won]], gt_boxes[gt_idx[won]]))
        if certain_by == "centred":
            key = key * centred
        else:  # the level of the best-quality pick, and on it the cell nearest the centre
            level = strides[point_idx[won]]
            best_stride = level.new_zeros(num_gts)
            order = _sort_groups(gt_idx[won], key)
            first = _first_in_group(gt_idx[won][order])
            best_stride[gt_idx[won][order][first]] = level[order][first]
            key = (level == best_stride[gt_idx[won]]).float() * 2 + centred
    elif certain_by == "score":  # the pick the network already ranks first
        key = prob[won]
    elif certain_by == "iou":  # the pick with the best box, whatever it scores
        key = iou[won]
    elif certain_by == "leader":  # the best-scored of the picks near the best quality
        if certain_margin < 0:
            raise ValueError(f"model.certain_margin must be >= 0, got {certain_margin}")
        best = _group_max(gt_idx[won], key, num_gts)
        near_best = key >= best[gt_idx[won]] - certain_margin
        key = near_best.to(key.dtype) * 2 + prob[won]
    elif certain_by != "quality":
        raise ValueError("model.certain_by must be quality, score, iou, leader, centred or "
                         f"centred_in_level, got {certain_by!r}")
    won = won[_sort_groups(gt_idx[won], key)]
    pos, pos_gt, pos_prob = point_idx[won], gt_idx[won], prob[won]
    certain = _first_in_group(pos_gt)
    soft_prob = torch.where(certain, 0.0, pos_prob)
    max_soft_prob = _group_max(pos_gt, soft_prob, num_gts)
    soft = pos_prob / max_soft_prob[pos_gt].clamp(min=torch.finfo(pos_prob.dtype).tiny) * t

    # 7. Class and (l, t, r, b) regression target of every positive.
    box = gt_boxes[pos_gt]
    p = points[pos]
    out.gt_index[pos] = pos_gt
    out.labels[pos] = gt_labels[pos_gt]
    out.box_targets[pos] = paired_distances(p, box)
    # clamped: a label of 0 would make the peak a negative
    certain_target = iou[won].clamp(min=0.01) if certain_label == "iou" else 1.0
    out.soft_labels[pos] = torch.where(certain, certain_target, soft)
    soft_weights: Tensor | float = soft_weight
    if soft_cap is not None:
        soft_weights = torch.where(pos_prob >= soft_cap, soft_weight, below_cap_weight)
    if top_soft_weight is not None:
        max_prob = _group_max(pos_gt, pos_prob, num_gts)
        soft_weights = torch.where(pos_prob >= max_prob[pos_gt], top_soft_weight, soft_weights)
    out.weights[pos] = torch.where(certain, certain_weight, soft_weights)
    out.certain[pos] = certain
    return out



def certain_box_weights(a: Assignment, factor: float) -> Tensor:
    """Each positive's box-loss weight (``Assignment.box_weights``): the centerness of its
    target (the release's weighting), times ``factor`` at the certain positives
    (``model.certain_box_weight``), so the box regression spends more on the cell that is
    to carry the object's one detection. 0 at negatives."""
    if factor < 0:
        raise ValueError(f"model.certain_box_weight must be >= 0, got {factor}")
    weights = a.soft_labels.new_zeros(a.labels.shape[0])
    pos = a.positive
    scale = torch.where(a.certain[pos], factor, 1.0)
    weights[pos] = centerness(a.box_targets[pos]) * scale
    return weights


def assign_o2f(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor, cfg: ModelConfig,
               *, t: float, soft_anchors: bool = True) -> Assignment:
    """``model.assign=o2f``: one-to-few with ``model.o2f_topk``, or k = 1 in the last phase
    without soft anchors (``soft_anchors=False``, ``model.o2o_from``). ``model.soft_push``
    names the loss: ``joint`` (the release) or ``obj`` (soft anchors pushed down through
    the objectness only); ``model.rank_weight`` adds the certain-positive ranking loss;
    ``model.certain_box_weight`` weighs the certain positives' box loss."""
    if cfg.soft_push not in ("joint", "obj"):
        raise ValueError(f"model.soft_push must be joint or obj, got {cfg.soft_push!r}")
    out = one_to_few(pred.points, pred.strides, pred.scores, pred.boxes, gt_boxes, gt_labels,
                      num_classes=cfg.num_classes, t=t,
                      topk=cfg.o2f_topk if soft_anchors else 1, alpha=cfg.alpha,
                      radius=cfg.radius, soft_weight=soft_weight_at(t, cfg),
                      certain_weight=cfg.certain_weight, certain_label=cfg.certain_label,
                      top_soft_weight=cfg.soft_weight_top, certain_by=cfg.certain_by,
                      certain_margin=cfg.certain_margin, soft_cap=cfg.soft_cap,
                      below_cap_weight=cfg.soft_weight,
                      level_shapes=pred.level_shapes)
    if cfg.certain_box_weight != 1.0:
        out.box_weights = certain_box_weights(out, cfg.certain_box_weight)
    if cfg.soft_push == "obj":
        out.loss = "soft_focal_obj"
    if cfg.rank_weight:
        out.loss_options["rank_weight"] = rank_weight_at(t, cfg)
    if cfg.aux_branch not in ("", "release"):
        raise ValueError(f"model.aux_branch must be '' or release, got {cfg.aux_branch!r}")
    if cfg.aux_branch and pred.one_to_many is not None:
        out.aux = release_assignment(pred.one_to_many, gt_boxes, gt_labels, cfg, t=t)
    return out


def release_assignment(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor,
                       cfg: ModelConfig, *, t: float) -> Assignment:
    """The release's one-to-few assignment of ``pred`` at the point of training where the
    configured ceiling is ``t``: the same share of the fall from ``t_start``, to the
    release's end (0.2) rather than the configured one, the soft anchors at
    ``model.soft_weight`` throughout, the certain positive by quality with label 1 (the
    training-only branch of ``model.aux_branch=release``)."""
    release_end = RECIPES["release"]["t_end"]
    t_release = cfg.t_start - _share_of_fall(t, cfg) * (cfg.t_start - release_end)
    return one_to_few(pred.points, pred.strides, pred.scores, pred.boxes, gt_boxes, gt_labels,
                      num_classes=cfg.num_classes, t=t_release, topk=cfg.o2f_topk,
                      alpha=cfg.alpha, radius=cfg.radius, soft_weight=cfg.soft_weight,
                      level_shapes=pred.level_shapes)


def assign_o2o(pred: DensePrediction, gt_boxes: Tensor, gt_labels: Tensor, cfg: ModelConfig,
               *, t: float, soft_anchors: bool = True) -> Assignment:
    """``model.assign=o2o``: the paper's one-to-one baseline, one-to-few with k = 1."""
    return assign_o2f(pred, gt_boxes, gt_labels, cfg, t=t, soft_anchors=False)
