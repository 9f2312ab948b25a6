"""The O2F head: FCOS-style towers shared by all FPN levels, plus an objectness branch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _gn(channels: int) -> nn.GroupNorm:
    groups = 32 if channels % 32 == 0 else math.gcd(channels, 32)
    return nn.GroupNorm(groups, channels)


def _tower(c_in: int, c_out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1), _gn(c_out),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _conv_in_float32(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` as float32: computed in float32 under low-precision autocast (for the
    convs whose outputs are, or weigh, distances in pixels), else in ``x``'s dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return conv(x.float())
    return conv(x).float()


class Scale(nn.Module):
    """A learnable scalar (one per FPN level), initialised to 1."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class MaxFilter3D(nn.Module):
    """DeFCN's 3D max filtering (Wang et al., CVPR 2021), a layer of the network.

    Per level l: a 3x3 conv of every level's map, then at each cell the maximum over its
    ``kernel`` x ``kernel`` neighbourhood on level l and on the ``scales // 2`` levels on
    either side (resampled bilinearly to level l's size), added to the input, GN, ReLU.
    A cell whose neighbour (in space or scale) holds a stronger response learns to stay low
    in the branch that reads this: the duplicate suppression NMS would do, learnt, and
    part of the exported graph.

    ``forward(feats)``: a list of (B, C, H_l, W_l) maps, P3 first; returns the same shapes.
    """

    def __init__(self, channels: int, kernel: int = 3, scales: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = _gn(channels)
        self.kernel, self.margin = kernel, scales // 2

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        maps = [self.conv(f) for f in feats]
        out = []
        for level, (feat, x) in enumerate(zip(feats, maps, strict=True)):
            near = [x if k == level else
                    F.interpolate(maps[k], size=x.shape[-2:], mode="bilinear",
                                  align_corners=False)
                    for k in range(max(0, level - self.margin),
                                   min(len(maps), level + self.margin + 1))]
            # The max over (scale, window) is the max over scales of the window's max.
            peak = F.max_pool2d(torch.stack(near, 0).amax(0), self.kernel, stride=1,
                                padding=self.kernel // 2)
            out.append(torch.relu(self.norm(peak + feat)))
        return out


class BoxVote(nn.Module):
    """Each cell's box as a learnt weighted mean of the boxes of its 3x3 neighbourhood on
    its level (box voting inside the network: nothing is removed, and it is part of the
    exported graph), so the cell that carries an object's one detection can take the box
    of a neighbour that regresses the object better.

    ``forward(reg_feat, ltrb, stride)``: the reg tower's map (B, C, H, W) gives 9 logits
    per cell (a 3x3 conv), softmax over the neighbours inside the map; neighbour j at
    (dx, dy) cells predicts distances (l_j, t_j, r_j, b_j) from its own point, which are
    (l_j - dx s, t_j - dy s, r_j + dx s, b_j + dy s) from this cell's. Returns the weighted
    mean (B, 4, H, W), in float32 (the distances reach the image size). Initialised to keep
    most of the cell's own box (weight e^4 / (e^4 + 8) = 0.87).
    """

    NEIGHBOURS = [(dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.logits = nn.Conv2d(channels, 9, 3, padding=1)
        nn.init.zeros_(self.logits.weight)
        with torch.no_grad():
            self.logits.bias.zero_()
            self.logits.bias[4] = 4.0  # (dx, dy) = (0, 0): the cell itself
        # neighbour j's distances seen from this cell, per pixel of stride
        shifts = torch.tensor([[-dx, -dy, dx, dy] for dx, dy in self.NEIGHBOURS],
                              dtype=torch.float32)
        self.register_buffer("shifts", shifts.view(1, 9, 4, 1, 1), persistent=False)

    def forward(self, reg_feat: Tensor, ltrb: Tensor, stride: int) -> Tensor:
        height, width = ltrb.shape[-2:]
        padded = F.pad(ltrb.float(), (1, 1, 1, 1))
        inside = F.pad(ltrb.new_ones(1, 1, height, width, dtype=torch.float32), (1, 1, 1, 1))
        windows = [(..., slice(1 + dy, 1 + dy + height), slice(1 + dx, 1 + dx + width))
                   for dx, dy in self.NEIGHBOURS]
        boxes = torch.stack([padded[w] for w in windows], 1) + self.shifts * stride
        valid = torch.cat([inside[w] for w in windows], 1)
        logits = _conv_in_float32(self.logits, reg_feat).masked_fill(valid == 0, float("-inf"))
        return (boxes * logits.softmax(1).unsqueeze(2)).sum(1)  # (B, 4, H, W)


class O2FHead(nn.Module):
    """Shared head over P3-P7.

    Per level l with stride s_l and feature map H_l x W_l:
      - cls tower (``num_convs`` x conv-GN-ReLU) -> 3x3 conv to C logits;
      - reg tower -> 3x3 conv to 4 values, distances ltrb = ReLU(scale_l * value) * s_l
        in input pixels;
      - objectness branch on the reg tower output (``obj_convs`` x conv-GN-ReLU at
        ``obj_channels``) -> 3x3 conv to 1 logit. It has no loss of its own in o2f/o2o.
        With ``max_filter`` the reg tower outputs pass through :class:`MaxFilter3D` (across
        levels) before this branch, as DeFCN's filter branch does. With ``box_vote`` each
        cell's distances are a learnt mean over its 3x3 neighbours' (:class:`BoxVote`).

    With ``one_to_many_branch`` (``model.assign=dual`` or ``model.aux_branch``) the head
    holds a second head of the same shape, ``one_to_many``, trained beside it with
    one-to-many (or the release's one-to-few) targets and never run at inference; this
    head then reads the FPN features detached (YOLOv10's rule: the backbone and neck learn
    from the one-to-many branch only).

    ``forward(feats)`` returns, with N = sum_l H_l * W_l (level P3 first, row-major):
      cls_logits (B, N, C), box_ltrb (B, N, 4) pixels, obj_logits (B, N).
    """

    def __init__(self, in_channels: int, num_classes: int, strides: list[int], *,
                 channels: int = 256, num_convs: int = 4, obj_channels: int = 64,
                 obj_convs: int = 3, prior_prob: float = 0.01,
                 max_filter: bool = False, one_to_many_branch: bool = False,
                 box_vote: bool = False) -> None:
        super().__init__()
        self.num_classes, self.strides = num_classes, list(strides)
        self.cls_tower = _tower(in_channels, channels, num_convs)
        self.reg_tower = _tower(in_channels, channels, num_convs)
        self.max_filter = MaxFilter3D(channels) if max_filter else None
        self.obj_tower = _tower(channels, obj_channels, obj_convs)
        self.cls_out = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(channels, 4, 3, padding=1)
        self.obj_out = nn.Conv2d(obj_channels if obj_convs else channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in strides)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        self.box_vote = BoxVote(channels) if box_vote else None  # its own initialisation
        self.one_to_many = O2FHead(in_channels, num_classes, strides, channels=channels,
                                   num_convs=num_convs, obj_channels=obj_channels,
                                   obj_convs=obj_convs, prior_prob=prior_prob,
                                   ) if one_to_many_branch else None

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return self.forward_features(feats)[:3]

    def box_distances(self, reg_feat: Tensor, scale: Scale, stride: int) -> Tensor:
        """ltrb (B, 4, H, W) in pixels from one level's reg tower map, in float32 even
        under low-precision autocast: the distances reach the image size, where bfloat16's
        8-bit mantissa would cost up to a few pixels, so the last conv, the scale and the
        stride stay in float32 (a 4-channel conv: a negligible share of the work)."""
        return torch.relu(scale(_conv_in_float32(self.reg_out, reg_feat))) * stride

    def forward_features(self, feats: list[Tensor]
                         ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """:meth:`forward`'s outputs plus the reg tower's maps of each level (for heads
        that read more off them)."""
        cls_all, box_all, obj_all = [], [], []
        if self.one_to_many is not None:
            feats = [f.detach() for f in feats]
        reg_feats = [self.reg_tower(feat) for feat in feats]
        obj_feats = self.max_filter(reg_feats) if self.max_filter is not None else reg_feats
        for feat, reg_feat, obj_feat, scale, stride in zip(
                feats, reg_feats, obj_feats, self.scales, self.strides, strict=True):
            cls_all.append(self.cls_out(self.cls_tower(feat)).float().flatten(2))
            ltrb = self.box_distances(reg_feat, scale, stride)
            if self.box_vote is not None:
                ltrb = self.box_vote(reg_feat, ltrb, stride)
            box_all.append(ltrb.flatten(2))
            obj_all.append(self.obj_out(self.obj_tower(obj_feat)).float().flatten(2))
        cls_logits = torch.cat(cls_all, 2).transpose(1, 2)
        box_ltrb = torch.cat(box_all, 2).transpose(1, 2)
        obj_logits = torch.cat(obj_all, 2)[:, 0]
        return cls_logits, box_ltrb, obj_logits, reg_feats


def make_points(shapes: list[tuple[int, int]], strides: list[int], device: torch.device,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Cell centres of every level, ((x + 0.5) * s, (y + 0.5) * s).

    Returns points (N, 2) in input pixels and strides (N,), level P3 first, row-major.
    """
    points, point_strides = [], []
    for (h, w), s in zip(shapes, strides, strict=True):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
        point_strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
    return torch.cat(points), torch.cat(point_strides)


def decode(points: Tensor, ltrb: Tensor) -> Tensor:
    """Distances (..., 4) ltrb from points (..., 2) to boxes x1y1x2y2 (pixels)."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], -1)
