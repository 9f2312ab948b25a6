"""Duplicate removal learnt at the end of the network, with no NMS: the top-k detections
rescored by a small relation network over their pairwise geometry and scores
(``model.rescore``; docs/algorithm.md section 4, docs/ablation.md "End to end in fact").

A dense detector repeats an object on a neighbouring cell; NMS removes the repeat by a
fixed rule (same class, IoU above a threshold, lower score). Here each detection reads,
from every detection overlapping it, what a learnt function of the pair makes of it (their
IoU, the share of each covered by the other, relative offset and size, score gap, same
class or not), takes the maximum over them, and corrects its own score: the role of the
duplicate-removal module of Relation Networks (Hu et al., CVPR 2018) and of GossipNet
(Hosang et al., CVPR 2017), and of self-attention in DETR's decoder. Being learnt, it can
keep two overlapping detections of two objects in a crowd, where NMS drops one.

Its output is, per detection, the probability q that it is its object's one detection; the
final score is the detector's score s times floor + (1 - floor) q: the ranking among kept
detections stays the detector's, and a repeat is demoted to a share ``floor`` of its score
(``model.rescore_floor=0.2``, under the 0.3 a picture is drawn at, as the release's soft
anchors end under 0.2), not deleted: COCO AP still counts it as a second chance, as it
counts the release's low-scored soft anchors.

It is trained beside the detector on the detector's own detached top-k, on the detections
of objects only: the best-scored detection of a ground truth (what the COCO evaluator
counts as its true positive) is to be kept, its other detections (the repeats) are not; a
detection of no object is not asked about, as telling objects from background is the
detector's part. The dense head keeps its own assignment and losses unchanged. Everything
is a tensor op of fixed shape: it is part of the exported graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from o2f.losses import reduce_mean

PAIR_FEATURES = 9


def pair_features(boxes: Tensor, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """What detection i reads of detection j, for every pair of a batch's detections.

    boxes (B, K, 4) x1y1x2y2 pixels, logits (B, K) score logits, labels (B, K). Returns
    features (B, K, K, 9), row i column j: IoU, intersection over i's area, over j's area,
    j's centre offset in i's width and height (clamped to +-4), log of j's width and height
    over i's (clamped to +-4), j's logit minus i's (clamped to +-10), same label (1/0); and
    overlap (B, K, K) bool: the pairs i != j whose boxes intersect (the others are not read).
    """
    boxes = boxes.float()
    wh = (boxes[..., 2:] - boxes[..., :2]).clamp(min=1e-3)  # (B, K, 2)
    centre = (boxes[..., 2:] + boxes[..., :2]) / 2
    area = wh.prod(-1)
    top_left = torch.maximum(boxes[:, :, None, :2], boxes[:, None, :, :2])
    bottom_right = torch.minimum(boxes[:, :, None, 2:], boxes[:, None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)  # (B, K, K)
    union = area[:, :, None] + area[:, None, :] - inter
    offset = (centre[:, None, :, :] - centre[:, :, None, :]) / wh[:, :, None, :]
    size = torch.log(wh[:, None, :, :] / wh[:, :, None, :])
    gap = logits[:, None, :] - logits[:, :, None]
    same = (labels[:, :, None] == labels[:, None, :]).float()
    features = torch.stack([
        inter / union, inter / area[:, :, None], inter / area[:, None, :],
        offset[..., 0].clamp(-4, 4), offset[..., 1].clamp(-4, 4),
        size[..., 0].clamp(-4, 4), size[..., 1].clamp(-4, 4),
        gap.clamp(-10, 10), same], -1)
    num = boxes.shape[1]
    not_self = ~torch.eye(num, dtype=torch.bool, device=boxes.device)
    return features, (inter > 0) & not_self


class RelationBlock(nn.Module):
    """One round of reading the neighbours: per pair (i, j) an MLP of their features and
    j's state; per detection i the maximum over the j overlapping it (0 without any),
    then a residual update of i's state. ``forward(state (B, K, D), features (B, K, K, F),
    overlap (B, K, K))`` -> (B, K, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.pair = nn.Sequential(nn.Linear(PAIR_FEATURES + dim, dim), nn.ReLU(),
                                  nn.Linear(dim, dim), nn.ReLU())
        self.update = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, state: Tensor, features: Tensor, overlap: Tensor) -> Tensor:
        # The pair MLP's first layer on [features_ij, state_j], as the sum of its two parts:
        # the state's part computed once per detection, not once per pair (same result).
        first = self.pair[0]
        w_pair, w_state = first.weight.split([PAIR_FEATURES, state.shape[-1]], 1)
        hidden = F.linear(features, w_pair) + F.linear(state, w_state, first.bias)[:, None]
        messages = self.pair[1:](hidden)  # >= 0 (ReLU)
        read = (messages * overlap[..., None]).amax(2)
        return state + self.update(torch.cat([state, read], -1))


class Rescorer(nn.Module):
    """The rescoring network: ``forward(boxes (B, K, 4), scores (B, K), labels (B, K))``
    returns keep logits (B, K), the log-odds that each detection is its object's one
    detection (:meth:`rescore` applies them). Each detection's state starts from its score
    logit, its rank among the K and its class; ``blocks`` rounds of :class:`RelationBlock`;
    a linear map to the logit, initialised to a constant 4 (every detection kept at 0.98:
    at the start of training the scores are the detector's). Runs in float32 under
    autocast (a few small matrices; the score gaps it reads need the precision)."""

    def __init__(self, num_classes: int, dim: int = 64, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(2, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.classes = nn.Embedding(num_classes, dim)
        self.blocks = nn.ModuleList(RelationBlock(dim) for _ in range(blocks))
        self.keep = nn.Linear(dim, 1)
        nn.init.zeros_(self.keep.weight)
        nn.init.constant_(self.keep.bias, 4.0)

    def forward(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
        device = boxes.device.type
        with torch.autocast(device, enabled=False):
            logits = torch.logit(scores.float(), eps=1e-6)
            num = logits.shape[1]
            rank = torch.arange(num, device=boxes.device, dtype=torch.float32) / num
            own = torch.stack([logits.clamp(-10, 10) / 5, rank.expand_as(logits)], -1)
            state = self.embed(own) + self.classes(labels)
            features, overlap = pair_features(boxes, logits, labels)
            for block in self.blocks:
                state = block(state, features, overlap)
            return self.keep(state).squeeze(-1)

    def rescore(self, boxes: Tensor, scores: Tensor, labels: Tensor, floor: float = 0.0
                ) -> Tensor:
        """The final scores (B, K): the detector's s times floor + (1 - floor) q, q the
        probability of being kept."""
        keep = torch.sigmoid(self(boxes, scores, labels)).to(scores.dtype)
        return scores * (floor + (1 - floor) * keep)


def rescore_targets(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor,
                    gt_labels: Tensor, *, iou: float = 0.5) -> Tensor:
    """What the rescorer learns of one image's detections (K, ordered by descending score,
    as :meth:`O2F.postprocess` returns them): each detection goes to the ground truth of its
    class it overlaps most, if at IoU >= ``iou``; a ground truth's first detection (the
    best-scored) is 1 (keep), its later ones 0 (repeats), and a detection of no ground
    truth -1 (left out of the loss). (K,) int64."""
    if gt_boxes.numel() == 0 or boxes.numel() == 0:
        return torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=boxes.device)
    to_gt = box_iou(boxes.float(), gt_boxes.float().reshape(-1, 4))
    to_gt = to_gt * (labels[:, None] == gt_labels[None, :])
    best, gt = to_gt.max(1)
    order = torch.arange(boxes.shape[0], device=boxes.device)
    candidate = torch.where(best >= iou, order, boxes.shape[0])
    first = candidate.new_full((gt_boxes.shape[0],), boxes.shape[0]).scatter_reduce(
        0, gt, candidate, "amin")
    keep = (first[gt] == order).long()
    return torch.where(best >= iou, keep, -1)


def rescore_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of the keep logits (B, K) against :func:`rescore_targets`
    (B, K), over the detections of an object (target 0 or 1), summed and divided by the
    number to keep (averaged over processes, as the detector's normalisers; at least 1)."""
    counted = targets >= 0
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.clamp(min=0).float(),
                                              reduction="none")
    kept = reduce_mean((targets == 1).sum().to(torch.float32))
    return (loss * counted).sum() / kept.clamp(min=1)
