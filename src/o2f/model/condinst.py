"""CondInst trained with one-to-few assignment: instance masks from the NMS-free detector
(docs/algorithm.md section 7).

Every point of the detector predicts, besides its class scores and box, the parameters of
a tiny *dynamic* mask head: three 1x1 convs (``dynamic_channels`` = 8, 8, then 1 output)
that run over the image's shared mask features plus two channels of coordinates relative
to the point. With 8 mask bases that is (8 + 2) * 8 + 8 + 8 * 8 + 8 + 8 * 1 + 1 = 169
numbers per point, emitted by one 3x3 "controller" conv on the regression tower.

    FPN P3 (+ P4, P5) -> MaskBranch -> mask_feats (B, 8, H/8, W/8)
    regression tower  -> controller -> params (B, N, 169)

Training: the assignment is the detector's own (one_to_few, k = 7); each positive point
(certain or soft) runs its dynamic head on its image's mask features, the logits are
upsampled x2 to stride 4, and a Dice loss (weight 2) compares them with its assigned gt
mask (``Assignment.gt_index``) area-averaged to stride 4 of the padded batch.
Inference: the same top-k as the detector, no NMS; each kept detection's head is run, its
probabilities are resampled at every pixel of the input image and thresholded at 0.5.

Grids: a cell (i, j) of a stride-s map covers pixels [s*j, s*j + s) x [s*i, s*i + s) of the
padded batch, centre ((j + 0.5) * s, (i + 0.5) * s); every resampling here is bilinear with
``align_corners=False``, which keeps exactly those centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from o2f.assign import Assignment
from o2f.config import ModelConfig
from o2f.losses import dice_loss
from o2f.model.detector import O2F, HeadOutputs
from o2f.model.head import O2FHead, make_points

MASK_STRIDE = 4  # stride of the predicted masks (the loss is computed there)
COORD_SCALE = 8  # relative coordinates are divided by 8 x the point's stride, as the release


def dynamic_param_count(num_bases: int = 8, channels: int = 8, layers: int = 3) -> int:
    """Parameters of one dynamic mask head: ``layers`` 1x1 convs with weights and biases,
    (num_bases + 2) -> channels -> ... -> channels -> 1. 169 for the defaults."""
    shapes = DynamicMaskHead(num_bases, channels, layers).layer_shapes
    return sum(c_out * c_in + c_out for c_in, c_out in shapes)


class DynamicMaskHead(nn.Module):
    """Runs K per-instance mask heads whose weights are inputs, not parameters.

    ``forward(mask_feats, params, points, strides, feat_stride)``:
      - mask_feats (C, H, W): one image's mask features, a stride-``feat_stride`` map;
      - params (K, P): each instance's flat parameters, P = :attr:`num_params`, laid out
        as every layer's weight (c_out x c_in, row-major), then every layer's bias;
      - points (K, 2) pixels, strides (K,): the instances' points and their levels' strides.
    Returns mask logits (K, H, W). Input channels are (x, y) of the point minus the cell
    centre, divided by ``COORD_SCALE`` * stride, then the C mask features.
    """

    def __init__(self, num_bases: int = 8, channels: int = 8, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError("the dynamic mask head needs at least one layer")
        widths = [num_bases + 2] + [channels] * (layers - 1) + [1]
        self.layer_shapes = list(zip(widths[:-1], widths[1:], strict=True))  # (c_in, c_out)
        self.num_params = sum(o * i + o for i, o in self.layer_shapes)

    def split(self, params: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(K, P) -> per layer (weight (K, c_out, c_in), bias (K, c_out))."""
        k = params.shape[0]
        sizes = [o * i for i, o in self.layer_shapes] + [o for _, o in self.layer_shapes]
        chunks = params.split(sizes, dim=1)
        n = len(self.layer_shapes)
        return [(chunks[j].reshape(k, o, i), chunks[n + j])
                for j, (i, o) in enumerate(self.layer_shapes)]

    def forward(self, mask_feats: Tensor, params: Tensor, points: Tensor, strides: Tensor,
                feat_stride: int) -> Tensor:
        c, h, w = mask_feats.shape
        k = params.shape[0]
        cells, _ = make_points([(h, w)], [feat_stride], mask_feats.device, points.dtype)
        rel = (points[:, None, :] - cells[None]) / (COORD_SCALE * strides[:, None, None])
        x = torch.cat([rel.transpose(1, 2).to(mask_feats.dtype),
                       mask_feats.reshape(1, c, h * w).expand(k, -1, -1)], 1)  # (K, C+2, HW)
        layers = self.split(params.to(mask_feats.dtype))
        for j, (weight, bias) in enumerate(layers):
            x = torch.baddbmm(bias[..., None], weight, x)
            if j < len(layers) - 1:
                x = torch.relu(x)
        return x.reshape(k, h, w)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MaskBranch(nn.Module):
    """The shared mask features: P3 (and, as the release, P4 and P5) each through a
    3x3 conv-BN-ReLU "refine" layer, the coarser ones upsampled to P3 and summed, then
    ``num_convs`` x (3x3 conv-BN-ReLU at ``channels``) and a 1x1 conv to ``num_bases``.

    ``forward(feats)`` with feats the FPN maps (P3 first) returns (B, num_bases, H3, W3).
    """

    def __init__(self, in_channels: int, channels: int = 128, num_convs: int = 4,
                 num_bases: int = 8, in_levels: int = 3) -> None:
        super().__init__()
        if in_levels < 1:
            raise ValueError("model.mask_in_levels must be at least 1 (P3)")
        self.refine = nn.ModuleList(_conv_bn_relu(in_channels, channels)
                                    for _ in range(in_levels))
        self.tower = nn.Sequential(*[_conv_bn_relu(channels, channels) for _ in range(num_convs)],
                                   nn.Conv2d(channels, num_bases, 1))
        for m in self.modules():  # what the release's head init gives these convs
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> Tensor:
        if len(feats) < len(self.refine):
            raise ValueError(f"the mask branch reads {len(self.refine)} FPN levels, "
                             f"got {len(feats)}")
        x = self.refine[0](feats[0])
        for refine, feat in zip(self.refine[1:], feats[1:], strict=False):
            x = x + F.interpolate(refine(feat), size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
        return self.tower(x)


class CondInstHead(O2FHead):
    """:class:`O2FHead` plus the controller: a 3x3 conv on the regression tower emitting
    ``num_params`` dynamic mask-head parameters per point.

    ``forward(feats)`` returns cls_logits (B, N, C), box_ltrb (B, N, 4) pixels,
    obj_logits (B, N) and params (B, N, num_params).
    """

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], *,
                 num_params: int, channels: int = 256, **kwargs) -> None:
        super().__init__(in_channels, num_classes, strides, channels=channels, **kwargs)
        self.controller = nn.Conv2d(channels, num_params, 3, padding=1)
        nn.init.normal_(self.controller.weight, std=0.01)
        nn.init.zeros_(self.controller.bias)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_logits, box_ltrb, obj_logits, reg_feats = self.forward_features(feats)
        params = torch.cat([self.controller(f).flatten(2) for f in reg_feats], 2)
        return cls_logits, box_ltrb, obj_logits, params.transpose(1, 2)


@dataclass
class InstanceHeadOutputs(HeadOutputs):
    """:class:`HeadOutputs` plus params (B, N, P), each point's dynamic mask-head
    parameters, and mask_feats (B, num_bases, H3, W3), the stride-8 mask features."""

    params: Tensor
    mask_feats: Tensor


def mask_targets(masks: Tensor, batch_size: tuple[int, int], stride: int = MASK_STRIDE
                 ) -> Tensor:
    """Ground-truth masks (G, h, w) of one image, in the batch's pixels (unpadded, or
    already padded to the batch), to the stride-``stride`` grid of the padded batch
    (H, W): zero-padded at the bottom/right, then each cell is the fraction of its
    ``stride`` x ``stride`` pixels inside the mask. Returns float (G, H / stride, W / stride).
    """
    height, width = batch_size
    m = masks[:, :height, :width].float()
    m = F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2]))
    if m.shape[0] == 0:
        return m.new_zeros(0, height // stride, width // stride)
    return F.avg_pool2d(m[None], stride)[0]


def paste_masks(probs: Tensor, image_size: tuple[int, int], out_size: tuple[int, int],
                threshold: float = 0.5, stride: int = MASK_STRIDE, chunk: int = 32) -> Tensor:
    """Masks in the output image's pixels from probabilities on the padded batch's grid.

    probs (K, Hm, Wm): a stride-``stride`` map of the padded batch; image_size (h, w): the
    image inside the batch (its top-left corner); out_size (H, W): the image the masks are
    for (the model's input, which the batch image was resized from). Each output pixel
    centre is mapped into the batch, the probability there is read bilinearly and compared
    with ``threshold``. Returns bool (K, H, W). Works ``chunk`` masks at a time.
    """
    (h, w), (out_h, out_w) = image_size, out_size
    k, hm, wm = probs.shape
    out = torch.zeros(k, out_h, out_w, dtype=torch.bool, device=probs.device)
    if k == 0:
        return out
    # pixel centre -> batch pixels -> [-1, 1] over the padded map (align_corners=False)
    ys = (torch.arange(out_h, device=probs.device, dtype=torch.float32) + 0.5) * (h / out_h)
    xs = (torch.arange(out_w, device=probs.device, dtype=torch.float32) + 0.5) * (w / out_w)
    gy, gx = ys / (hm * stride) * 2 - 1, xs / (wm * stride) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None]  # (1, H, W, 2)
    for start in range(0, k, chunk):
        part = probs[start:start + chunk].float()[None]
        sampled = F.grid_sample(part, grid, mode="bilinear", padding_mode="border",
                                align_corners=False)[0]
        out[start:start + chunk] = sampled > threshold
    return out


class CondInst(O2F):
    """The O2F detector with CondInst masks (``model.task = "instance"``).

    Same API as :class:`O2F`; in addition:
      - training targets carry ``masks`` (G x H x W, uint8/bool/float in [0, 1]) in the
        input's pixels (list-of-images API; they are resized with the images) or in the
        batch's pixels (batch API, padded or not), one per box; the loss dict gains
        ``loss_mask`` (Dice, x ``cfg.mask_weight``);
      - each detection dict gains ``masks`` (K x H x W bool) in the input image's pixels
        (the batch's, cropped to the image, for the batch API).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.assign == "dual" or cfg.aux_branch:
            raise ValueError("model.assign=dual and model.aux_branch need a second head "
                             "branch, which the instance model does not have")
        super().__init__(cfg)
        self.mask_head = DynamicMaskHead(cfg.mask_bases, cfg.dynamic_channels)
        # the detection head again, with the controller conv on its regression tower
        self.head = CondInstHead(cfg.fpn_channels, cfg.num_classes, self.strides,
                                 num_params=self.mask_head.num_params,
                                 channels=cfg.head_channels, num_convs=cfg.head_convs,
                                 obj_channels=cfg.obj_channels, obj_convs=cfg.obj_convs,
                                 max_filter=cfg.max_filter, box_vote=cfg.box_vote)
        self.mask_branch = MaskBranch(cfg.fpn_channels, cfg.mask_channels, cfg.mask_convs,
                                      cfg.mask_bases, min(cfg.mask_in_levels, cfg.num_levels))
        if self.strides[0] % MASK_STRIDE:
            raise ValueError(f"P3 stride {self.strides[0]} is not a multiple of {MASK_STRIDE}")

    # ------------------------------------------------------------------ network
    def preprocess(self, images: list[Tensor], targets: list[dict] | None = None
                   ) -> tuple[Tensor, list[tuple[int, int]], Tensor, list[dict] | None]:
        batch, sizes, factor, targets = super().preprocess(images, targets)
        if targets is not None:
            targets = [_resize_masks(tgt, size) for tgt, size in zip(targets, sizes, strict=True)]
        return batch, sizes, factor, targets

    def forward_dense(self, batch: Tensor) -> InstanceHeadOutputs:
        feats = self.neck(self.backbone(batch))
        cls_logits, box_ltrb, obj_logits, params = self.head(feats)
        shapes = [(f.shape[-2], f.shape[-1]) for f in feats]
        points, strides = make_points(shapes, self.strides, batch.device)
        return InstanceHeadOutputs(cls_logits, box_ltrb, obj_logits, points, strides, shapes,
                                   params=params, mask_feats=self.mask_branch(feats))

    def mask_logits(self, out: InstanceHeadOutputs, image: int, index: Tensor) -> Tensor:
        """Mask logits (K, H / 4, W / 4) on the padded batch's stride-4 grid for the points
        ``index`` (K,) of image ``image``."""
        if index.numel() == 0:
            h, w = (n * self.strides[0] // MASK_STRIDE for n in out.mask_feats.shape[-2:])
            return out.mask_feats.new_zeros(0, h, w)
        logits = self.mask_head(out.mask_feats[image], out.params[image, index],
                                out.points[index], out.strides[index], self.strides[0])
        return F.interpolate(logits[None], scale_factor=self.strides[0] // MASK_STRIDE,
                             mode="bilinear", align_corners=False)[0]

    # ------------------------------------------------------------------ training
    def losses(self, out: InstanceHeadOutputs, targets: list[dict], t: float, *,
               soft_anchors: bool = True) -> dict[str, Tensor]:
        """loss_cls, loss_box (GIoU x reg_weight) and loss_mask (Dice x mask_weight), all
        from one assignment."""
        assignments = self.assign(out, targets, t, soft_anchors=soft_anchors)
        losses = self.detection_losses(out, targets, assignments)
        losses["loss_mask"] = self.mask_loss(out, targets, assignments)
        return losses

    def mask_loss(self, out: InstanceHeadOutputs, targets: list[dict],
                  assignments: list[Assignment]) -> Tensor:
        """mask_weight x the mean Dice loss over the positive points of the batch, each
        against its assigned gt mask at stride 4.

        ``cfg.mask_max_pos`` > 0 caps the positives per image (memory: each costs a
        (10 + 8 + 8 + 1)-channel map at stride 8 and a stride-4 mask, with gradients);
        the certain positives go first, then soft anchors by falling soft label.
        """
        batch_size = (out.mask_feats.shape[-2] * self.strides[0],
                      out.mask_feats.shape[-1] * self.strides[0])
        preds, gts = [], []
        for i, (tgt, a) in enumerate(zip(targets, assignments, strict=True)):
            masks = tgt.get("masks")
            num_boxes = len(tgt["boxes"])
            if (masks is None and num_boxes) or (masks is not None and len(masks) != num_boxes):
                raise ValueError("the instance model needs targets['masks'] (G x H x W), "
                                 "one mask per box")
            pos = torch.nonzero(a.positive).squeeze(1)
            if self.cfg.mask_max_pos > 0 and pos.numel() > self.cfg.mask_max_pos:
                key = a.soft_labels[pos] + (0 if a.certain is None else a.certain[pos])
                order = torch.argsort(key, descending=True, stable=True)
                pos = pos[order[: self.cfg.mask_max_pos]]
            if pos.numel() == 0:
                continue
            gt = mask_targets(masks.to(out.mask_feats.device), batch_size)
            preds.append(self.mask_logits(out, i, pos))
            gts.append(gt[a.gt_index[pos]])
        if not preds:  # still touch the graph so every parameter gets a (zero) gradient
            return (out.mask_feats.sum() + out.params.sum()) * 0.0
        probs = torch.sigmoid(torch.cat(preds).float())
        return self.cfg.mask_weight * dice_loss(probs, torch.cat(gts)).mean()

    # ------------------------------------------------------------------ inference
    def inference(self, out: InstanceHeadOutputs, image_sizes: list[tuple[int, int]],
                  factor: Tensor | None, input_sizes: list[tuple[int, int]]) -> list[dict]:
        """The detector's NMS-free top-k, then each kept detection's mask pasted into its
        input image: ``{boxes, scores, labels, masks (K, H, W) bool}``."""
        boxes, scores, labels, index = self.postprocess(out, image_sizes, return_index=True)
        results = []
        for i in range(boxes.shape[0]):
            keep = scores[i] > self.cfg.score_thresh
            b = boxes[i][keep]
            if factor is not None:
                b = b / factor[i].repeat(2)
            h, w = (int(v) for v in image_sizes[i])
            out_size = tuple(int(v) for v in input_sizes[i])
            probs = torch.sigmoid(self.mask_logits(out, i, index[i][keep]).float())
            masks = paste_masks(probs, (h, w), out_size, self.cfg.mask_thresh)
            results.append({"boxes": b, "scores": scores[i][keep], "labels": labels[i][keep],
                            "masks": masks})
        return results


def _resize_masks(target: dict, size: tuple[int, int]) -> dict:
    """``target['masks']`` resized (bilinear, as float in [0, 1]) to the resized image."""
    masks = target.get("masks")
    if masks is None or tuple(masks.shape[-2:]) == tuple(size):
        return target
    target = dict(target)
    if masks.shape[0] == 0:
        target["masks"] = masks.new_zeros(0, *size, dtype=torch.float32)
    else:
        target["masks"] = F.interpolate(masks[None].float(), size=size, mode="bilinear",
                                        align_corners=False)[0]
    return target
