"""The O2F detector: backbone -> FPN -> head, trained with one-to-few assignment and
evaluated with a plain top-k (no NMS).

The API is torchvision's: ``model(images, targets)`` in train mode returns a dict of scalar
losses, ``model(images)`` in eval mode a list of ``{boxes, scores, labels}``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from o2f.assign import Assignment, DensePrediction, box_distances, get_rule
from o2f.config import ModelConfig
from o2f.data.transforms import PIXEL_MEAN, PIXEL_STD
from o2f.losses import DENSE_LOSSES, centerness, weighted_giou_loss
from o2f.model.backbone import FPN, build_backbone
from o2f.model.head import O2FHead, decode, make_points
from o2f.model.rescore import Rescorer, rescore_loss, rescore_targets


@dataclass
class HeadOutputs:
    """Dense outputs of a batch, N points over all levels (P3 first).

    cls_logits (B, N, C); box_ltrb (B, N, 4) pixels; obj_logits (B, N); points (N, 2)
    pixels; strides (N,); level_shapes: (H_l, W_l) of each level's map; one_to_many: the
    same of the head's one-to-many branch (``model.assign=dual``, training only), else None.
    """

    cls_logits: Tensor
    box_ltrb: Tensor
    obj_logits: Tensor
    points: Tensor
    strides: Tensor
    level_shapes: list[tuple[int, int]]
    one_to_many: HeadOutputs | None = field(default=None, kw_only=True)

    @property
    def level_sizes(self) -> list[int]:
        return [h * w for h, w in self.level_shapes]


class O2F(nn.Module):
    """FCOS-style dense detector with one-to-few label assignment.

    ``forward(images, targets=None, *, image_sizes=None, t=None)``:
      - ``images``: a list of 3 x H_i x W_i float tensors in [0, 1] (the model resizes to
        ``cfg.min_size``/``cfg.max_size``, normalises and pads; boxes come back in each
        input's own pixels), or an already normalised, padded batch B x 3 x H x W with
        ``image_sizes`` [(h, w)] of the unpadded images (boxes stay in the batch's pixels).
      - ``targets``: list of dicts with ``boxes`` (G x 4, x1y1x2y2 pixels of the input) and
        ``labels`` (G,) int64; optional ``ignore_boxes`` (K x 4).
      - ``t``: the soft-label ceiling (``o2f.assign.soft_label_ceiling(epoch, epochs)``);
        default ``cfg.t_end``.
      - ``soft_anchors``: False makes the soft anchors plain negatives (the assignment keeps
        one positive per object, as o2o): the last phase of ``model.o2o_from``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        get_rule(cfg.assign)  # an unknown model.assign fails here, not at the first step
        if cfg.aux_branch and cfg.assign not in ("o2f", "o2o"):
            raise ValueError(f"model.aux_branch trains a one-to-few branch beside an o2f or "
                             f"o2o head, not beside model.assign={cfg.assign}")
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone, cfg.backbone_weights,
                                       frozen_stages=cfg.frozen_stages, norm_eval=cfg.norm_eval)
        self.strides = [8 * 2**i for i in range(cfg.num_levels)]
        self.neck = FPN(self.backbone.out_channels, cfg.fpn_channels, cfg.num_levels)
        self.head = O2FHead(cfg.fpn_channels, cfg.num_classes, self.strides,
                            channels=cfg.head_channels, num_convs=cfg.head_convs,
                            obj_channels=cfg.obj_channels, obj_convs=cfg.obj_convs,
                            max_filter=cfg.max_filter, box_vote=cfg.box_vote,
                            one_to_many_branch=cfg.assign == "dual" or bool(cfg.aux_branch))
        self.rescorer = Rescorer(cfg.num_classes) if cfg.rescore else None

    # ------------------------------------------------------------------ pre-processing
    def preprocess(self, images: list[Tensor], targets: list[dict] | None = None
                   ) -> tuple[Tensor, list[tuple[int, int]], Tensor, list[dict] | None]:
        """:func:`preprocess_images` with this model's sizes, plus the targets' boxes
        scaled into the batch's pixels."""
        batch, sizes, factor = preprocess_images(
            images, min_size=self.cfg.min_size, max_size=self.cfg.max_size,
            size_divisible=self.cfg.size_divisible, device=self.head.cls_out.weight.device)
        if targets is not None:
            targets = [_scale_target(tgt, f) for tgt, f in zip(targets, factor, strict=True)]
        return batch, sizes, factor, targets

    def fuse_batchnorm(self) -> O2F:
        """Fold every BatchNorm (``nn.BatchNorm2d`` in eval mode, or torchvision's
        ``FrozenBatchNorm2d``) that directly follows a conv into that conv's weight and bias,
        for inference (the model must stay in eval mode afterwards). Returns self."""
        from torch.nn.utils.fusion import fuse_conv_bn_weights
        from torchvision.ops import FrozenBatchNorm2d

        if self.training:
            raise RuntimeError("fuse_batchnorm() is for inference: call model.eval() first")
        for module in self.modules():
            names = list(module._modules)
            for first, second in zip(names, names[1:], strict=False):
                conv, bn = module._modules[first], module._modules[second]
                if not isinstance(conv, nn.Conv2d) or not isinstance(
                        bn, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                    continue
                fused = copy.deepcopy(conv)
                fused.weight, fused.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                    bn.weight, bn.bias)
                module._modules[first], module._modules[second] = fused, nn.Identity()
        return self

    # ------------------------------------------------------------------ network
    def forward_dense(self, batch: Tensor) -> HeadOutputs:
        """Dense outputs of a normalised, padded batch (B, 3, H, W); in training with the
        head's one-to-many branch, that branch's outputs too (never at inference)."""
        feats = self.neck(self.backbone(batch))
        cls_logits, box_ltrb, obj_logits = self.head(feats)
        shapes = [(f.shape[-2], f.shape[-1]) for f in feats]  # symbolic when exported
        points, strides = make_points(shapes, self.strides, batch.device)
        out = HeadOutputs(cls_logits, box_ltrb, obj_logits, points, strides, shapes)
        if self.training and self.head.one_to_many is not None:
            out.one_to_many = HeadOutputs(*self.head.one_to_many(feats), points, strides, shapes)
        return out

    def forward(self, images: list[Tensor] | Tensor, targets: list[dict] | None = None, *,
                image_sizes: list[tuple[int, int]] | None = None, t: float | None = None,
                soft_anchors: bool = True):
        factor = None
        if isinstance(images, Tensor) and images.dim() == 4:
            batch = images
            if image_sizes is None:
                image_sizes = [tuple(batch.shape[-2:])] * batch.shape[0]
            input_sizes = list(image_sizes)
        else:
            images = list(images)
            input_sizes = [tuple(img.shape[-2:]) for img in images]
            batch, image_sizes, factor, targets = self.preprocess(images, targets)
        out = self.forward_dense(batch)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses = self.losses(out, targets, self.cfg.t_end if t is None else t,
                                 soft_anchors=soft_anchors)
            if self.rescorer is not None:
                losses["loss_rescore"] = self.rescore_loss(out, targets, image_sizes)
            return losses
        return self.inference(out, image_sizes, factor, input_sizes)

    def inference(self, out: HeadOutputs, image_sizes: list[tuple[int, int]],
                  factor: Tensor | None, input_sizes: list[tuple[int, int]]) -> list[dict]:
        """Detections of a batch: ``postprocess``, padding dropped, boxes mapped back by
        ``factor`` (B, 2) when the model resized the inputs (``input_sizes`` are their
        (H, W), for outputs that need them)."""
        boxes, scores, labels = self.postprocess(out, image_sizes)
        results = []
        for i in range(boxes.shape[0]):
            keep = scores[i] > self.cfg.score_thresh
            b = boxes[i][keep]
            if factor is not None:
                b = b / factor[i].repeat(2)
            results.append({"boxes": b, "scores": scores[i][keep], "labels": labels[i][keep]})
        return results

    # ------------------------------------------------------------------ training
    def assign(self, out: HeadOutputs, targets: list[dict], t: float, *,
               soft_anchors: bool = True) -> list[Assignment]:
        """The assignment ``model.assign`` names (:data:`o2f.assign.ASSIGNMENTS`), per
        image, on the detached predictions; targets' boxes in the batch's pixels."""
        rule = get_rule(self.cfg.assign)
        with torch.no_grad():
            preds = _dense_predictions(out)
            result = []
            for pred, tgt in zip(preds, targets, strict=True):
                gt_boxes = tgt["boxes"].to(pred.scores).reshape(-1, 4)
                gt_labels = tgt["labels"].to(pred.scores.device, torch.int64).reshape(-1)
                result.append(rule(pred, gt_boxes, gt_labels, self.cfg, t=t,
                                   soft_anchors=soft_anchors))
        return result

    def losses(self, out: HeadOutputs, targets: list[dict], t: float, *,
               soft_anchors: bool = True) -> dict[str, Tensor]:
        """The losses the assignment names (``Assignment.loss``: loss_cls, for o2m also
        loss_obj) plus loss_box (GIoU x reg_weight); a second set of targets
        (``Assignment.aux``) adds the same keys with the suffix ``_aux``."""
        return self.detection_losses(out, targets, self.assign(
            out, targets, t, soft_anchors=soft_anchors))

    def detection_losses(self, out: HeadOutputs, targets: list[dict],
                         assignments: list[Assignment]) -> dict[str, Tensor]:
        """The losses of :meth:`losses` from given assignments (one per image)."""
        losses = self._dense_losses(out, targets, assignments)
        if assignments and assignments[0].aux is not None:
            aux_out = out.one_to_many if out.one_to_many is not None else out
            aux = self._dense_losses(aux_out, targets, [a.aux for a in assignments])
            losses.update({f"{k}_aux": v for k, v in aux.items()})
        return losses

    def _dense_losses(self, out: HeadOutputs, targets: list[dict],
                      assignments: list[Assignment]) -> dict[str, Tensor]:
        """Classification losses (``DENSE_LOSSES[a.loss]`` with ``a.loss_options``) and,
        when the targets regress,
        the GIoU loss weighted by ``a.box_weights`` (default: the targets' centerness)."""
        cfg = self.cfg
        a = Assignment.cat(assignments)
        cls_logits = out.cls_logits.reshape(-1, cfg.num_classes)
        obj_logits = out.obj_logits.reshape(-1)
        valid = self._valid_points(out.points, targets, assignments)
        losses = DENSE_LOSSES[a.loss](cls_logits, obj_logits, a, valid, **a.loss_options)
        if not a.regress:
            return losses
        ltrb = out.box_ltrb.reshape(-1, 4)
        points = out.points.repeat(len(assignments), 1)
        pos = torch.nonzero(a.labels < cfg.num_classes).squeeze(1)
        # Computed even without positives: its normaliser is a collective that every
        # process must join, whatever its own images hold.
        weight = (centerness(a.box_targets[pos]) if a.box_weights is None
                  else a.box_weights[pos])
        pred = decode(points[pos], ltrb[pos])
        target = decode(points[pos], a.box_targets[pos])
        losses["loss_box"] = cfg.reg_weight * weighted_giou_loss(pred, target, weight)
        if pos.numel() == 0:  # still touch the graph so every parameter gets a (zero) gradient
            losses["loss_box"] = losses["loss_box"] + ltrb.sum() * 0.0
        return losses

    def rescore_loss(self, out: HeadOutputs, targets: list[dict],
                     image_sizes: list[tuple[int, int]]) -> Tensor:
        """``model.rescore``: the rescorer's loss (x ``rescore_weight``) on the detector's
        own top-k, detached (:func:`o2f.model.rescore.rescore_targets`); targets' boxes in
        the batch's pixels. The dense head gets no gradient from it."""
        with torch.no_grad():
            boxes, scores, labels = self._candidates(out, image_sizes)[:3]
            goal = torch.stack([
                rescore_targets(b, s, lab, tgt["boxes"].to(b).reshape(-1, 4),
                                tgt["labels"].to(lab.device, torch.int64).reshape(-1))
                for b, s, lab, tgt in zip(boxes, scores, labels, targets, strict=True)])
        logits = self.rescorer(boxes, scores, labels)
        return self.cfg.rescore_weight * rescore_loss(logits, goal)

    def _valid_points(self, points: Tensor, targets: list[dict],
                      assignments: list[Assignment]) -> Tensor | None:
        """With ``ignore_mode='exclude'``: points inside an ignore box (and not positive)
        are left out of the classification loss. None when every point counts."""
        if self.cfg.ignore_mode != "exclude":
            return None
        masks = []
        for tgt, a in zip(targets, assignments, strict=True):
            ign = tgt.get("ignore_boxes")
            if ign is None or len(ign) == 0:
                masks.append(torch.ones_like(a.labels, dtype=torch.bool))
                continue
            inside = (box_distances(points, ign.to(points).reshape(-1, 4)).min(-1).values > 0)
            masks.append(~inside.any(1) | a.positive)
        return torch.cat(masks)

    # ------------------------------------------------------------------ inference
    def postprocess(self, out: HeadOutputs, image_sizes: list[tuple[int, int]] | Tensor,
                    *, return_index: bool = False) -> tuple[Tensor, ...]:
        """NMS-free top-k (docs/algorithm.md section 4), batched and of fixed shape.

        Per level the ``pre_topk`` best (point, class) pairs by p = sigmoid(cls) *
        sigmoid(obj); their boxes decoded and clipped to the unpadded image; over all levels
        the ``topk`` best. With ``model.rescore`` those ``topk`` scores are multiplied by
        floor + (1 - floor) x the rescorer's keep probabilities (:mod:`o2f.model.rescore`,
        ``model.rescore_floor``) and ordered again.
        Returns boxes (B, K, 4) in the batch's pixels, scores (B, K), labels (B, K); entries
        with score <= ``score_thresh`` are padding for the caller to drop. With
        ``cfg.use_nms`` a class-wise NMS runs before the final top-k. With ``return_index``
        also the point (B, K) int64 of each detection, an index into the N points (what the
        instance model reads its mask parameters from).
        """
        if self.rescorer is not None:
            boxes, scores, labels, points = self._candidates(out, image_sizes)
            scores = self.rescorer.rescore(boxes, scores, labels, self.cfg.rescore_floor)
        else:
            boxes, scores, labels, points = self._level_candidates(out, image_sizes)
        if self.cfg.use_nms:
            result = self._nms(boxes, scores, labels, points)
        else:
            result = _top(self.cfg.topk, boxes, scores, labels, points)
        return result if return_index else result[:3]

    def _candidates(self, out: HeadOutputs, image_sizes: list[tuple[int, int]] | Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The detector's own ``topk`` (boxes, scores, labels, points), by descending
        score: what the rescorer reads."""
        return _top(self.cfg.topk, *self._level_candidates(out, image_sizes))

    def _level_candidates(self, out: HeadOutputs, image_sizes: list[tuple[int, int]] | Tensor
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per level the ``pre_topk`` best (point, class) pairs, concatenated: boxes
        (B, M, 4) clipped to the unpadded images, scores (B, M), labels (B, M), points
        (B, M)."""
        cfg = self.cfg
        num_images, _, num_classes = out.cls_logits.shape
        sizes = torch.as_tensor(image_sizes, device=out.cls_logits.device, dtype=torch.float32)
        limit = sizes.flip(-1).repeat(1, 2)[:, None, :]  # (B, 1, 4) as w, h, w, h

        all_scores, all_boxes, all_labels, all_points = [], [], [], []
        start = 0
        for n in out.level_sizes:
            cls = out.cls_logits[:, start:start + n]  # (B, n, C)
            obj = out.obj_logits[:, start:start + n]  # (B, n)
            # A (point, class) pair can only be among the level's k best if its point is
            # among the k points with the best top-class score: rank points first, then
            # score the classes of those only (same result, a fraction of the work).
            k_points = torch.sym_min(cfg.pre_topk, n)
            best = torch.sigmoid(cls.max(-1).values) * torch.sigmoid(obj)
            candidates = best.topk(k_points, dim=1).indices  # (B, k_points)
            scores = torch.sigmoid(cls.gather(1, candidates[..., None].expand(
                -1, -1, num_classes))) * torch.sigmoid(obj.gather(1, candidates))[..., None]
            scores = scores.reshape(num_images, -1)
            top_scores, index = scores.topk(torch.sym_min(cfg.pre_topk, scores.shape[1]), dim=1)
            point = candidates.gather(1, torch.div(index, num_classes, rounding_mode="floor"))
            point = point + start
            ltrb = out.box_ltrb.gather(1, point[..., None].expand(-1, -1, 4))
            boxes = decode(out.points[point], ltrb)
            all_boxes.append(torch.minimum(boxes.clamp(min=0), limit))
            all_scores.append(top_scores)
            all_labels.append(index % num_classes)
            all_points.append(point)
            start += n
        return (torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1),
                torch.cat(all_points, 1))

    def _nms(self, boxes: Tensor, scores: Tensor, labels: Tensor, points: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Class-wise NMS then top-k, for the o2m baseline and ablations only."""
        k = self.cfg.topk
        out_b = boxes.new_zeros(boxes.shape[0], k, 4)
        out_s, out_l = scores.new_zeros(scores.shape[0], k), labels.new_zeros(labels.shape[0], k)
        out_p = points.new_zeros(points.shape[0], k)
        for i in range(boxes.shape[0]):
            ok = scores[i] > self.cfg.score_thresh
            b, s, lab, p = boxes[i][ok], scores[i][ok], labels[i][ok], points[i][ok]
            keep = batched_nms(b, s, lab, self.cfg.nms_iou)[:k]
            out_b[i, : keep.numel()], out_s[i, : keep.numel()] = b[keep], s[keep]
            out_l[i, : keep.numel()], out_p[i, : keep.numel()] = lab[keep], p[keep]
        return out_b, out_s, out_l, out_p


def _top(k: int, boxes: Tensor, scores: Tensor, labels: Tensor, points: Tensor
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``k`` best-scored (fewer if there are fewer) of (B, M) detections, in
    descending order of score."""
    scores, order = scores.topk(torch.sym_min(k, scores.shape[1]), dim=1)
    return (boxes.gather(1, order[..., None].expand(-1, -1, 4)), scores,
            labels.gather(1, order), points.gather(1, order))


def _dense_predictions(out: HeadOutputs) -> list[DensePrediction]:
    """Per image, what the assignment rules read of the detached outputs (float32)."""
    prob = torch.sigmoid(out.cls_logits.float()) * torch.sigmoid(out.obj_logits.float())[..., None]
    boxes = decode(out.points, out.box_ltrb.detach().float())
    o2m = [None] * len(prob) if out.one_to_many is None else _dense_predictions(out.one_to_many)
    return [DensePrediction(out.points, out.strides, out.level_shapes, prob[i], boxes[i],
                            out.cls_logits[i].detach().float(), one_to_many=o2m[i])
            for i in range(len(prob))]


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Keep-ratio scale: short side to ``min_size``, long side at most ``max_size``
    (``min_size`` <= 0: no resizing)."""
    if min_size <= 0:
        return 1.0
    scale = min_size / min(height, width)
    return min(scale, max_size / max(height, width)) if max_size > 0 else scale


def preprocess_images(images: list[Tensor], *, min_size: int, max_size: int,
                      size_divisible: int = 32, device: torch.device | str | None = None
                      ) -> tuple[Tensor, list[tuple[int, int]], Tensor]:
    """Resize (keep ratio, bilinear), normalise and pad 3 x H x W images in [0, 1].

    Returns the batch (B, 3, H, W), the unpadded sizes [(h, w)] and the scale factors
    (B, 2) as (sx, sy) = new / old, which map boxes back to the inputs' pixels.
    """
    mean = torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1) / 255
    std = torch.tensor(PIXEL_STD, device=device).view(3, 1, 1) / 255
    resized, sizes, factors = [], [], []
    for img in images:
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"expected 3 x H x W images, got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        scale = resize_scale(h, w, min_size, max_size)
        nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
        img = img.to(device, torch.float32)
        if (nh, nw) != (h, w):
            img = F.interpolate(img[None], size=(nh, nw), mode="bilinear",
                                align_corners=False)[0]
        resized.append((img - mean) / std)
        sizes.append((nh, nw))
        factors.append((nw / w, nh / h))
    batch = pad_batch(resized, size_divisible)
    return batch, sizes, torch.tensor(factors, device=batch.device)


def pad_batch(images: list[Tensor], size_divisible: int = 32) -> Tensor:
    """Stack 3 x h x w images, zero-padded at the bottom/right to a multiple of
    ``size_divisible`` (zeros after normalisation, as the release)."""
    h = max(img.shape[-2] for img in images)
    w = max(img.shape[-1] for img in images)
    d = max(size_divisible, 1)
    h, w = (h + d - 1) // d * d, (w + d - 1) // d * d
    batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
    for img, slot in zip(images, batch, strict=True):
        slot[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    return batch


def _scale_target(target: dict, factor: Tensor) -> dict:
    target = dict(target)
    scale = factor.repeat(2)
    for key in ("boxes", "ignore_boxes"):
        if key in target and target[key] is not None:
            target[key] = target[key].to(factor) * scale
    return target


def create_model(cfg: ModelConfig) -> O2F:
    """The model a ModelConfig describes: :class:`O2F` for ``task="detection"``, its
    CondInst subclass :class:`o2f.model.condinst.CondInst` for ``task="instance"``."""
    if cfg.task == "detection":
        return O2F(cfg)
    if cfg.task == "instance":
        from o2f.model.condinst import CondInst

        return CondInst(cfg)
    raise ValueError(f"model.task must be detection or instance, got '{cfg.task}'")


def build_model(config: str | ModelConfig | object = "r50_1x", **overrides) -> O2F:
    """Build an O2F model (or, for ``task="instance"``, the CondInst variant) from a preset
    name, a ModelConfig or a full Config.

    Keyword overrides set ModelConfig fields, e.g. ``build_model("r50_1x", num_classes=80)``.
    """
    from o2f.config import Config, load_config

    if isinstance(config, str):
        cfg = load_config(config).model
    elif isinstance(config, Config):
        cfg = config.model
    elif isinstance(config, ModelConfig):
        cfg = config
    else:
        raise TypeError(f"cannot build a model from {type(config).__name__}")
    cfg = ModelConfig(**{**cfg.__dict__, **overrides})
    return create_model(cfg)
