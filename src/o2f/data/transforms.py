"""Augmentation and batching of the release's recipes (docs/algorithm.md section 5).

Training: keep-ratio resize (short side ``min_size``, or a per-image integer drawn uniformly
from ``(lo, hi)`` for the multi-scale recipes; long side at most ``max_size``), horizontal
flip with probability 0.5, degenerate boxes dropped, pixels to float in [0, 1]. Evaluation:
only the float conversion (the model resizes inside). Everything box-aware goes through
``torchvision.transforms.v2`` on ``tv_tensors``, so boxes follow the image.

:func:`collate` then normalises with :data:`PIXEL_MEAN` / :data:`PIXEL_STD` and zero-pads the
batch at the bottom and right to a multiple of 32, as the release does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "PIXEL_MEAN",
    "PIXEL_STD",
    "KeepRatioResize",
    "SanitizeBoxes",
    "build_transforms",
    "collate",
    "keep_ratio_size",
]

PIXEL_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale (ImageNet)
PIXEL_STD = (58.395, 57.12, 57.375)


def keep_ratio_size(height: int, width: int, short: int, long: int) -> tuple[int, int]:
    """Output (height, width) of MMDetection's keep-ratio rescale.

    ``scale = min(short / min(h, w), long / max(h, w))``; each side is ``int(side * scale +
    0.5)``. E.g. 480 x 640 with (800, 1333) gives 800 x 1067.
    """
    scale = min(short / min(height, width), long / max(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


class KeepRatioResize(v2.Transform):
    """Resize image and boxes so the short side is ``min_size`` and the long side at most
    ``max_size`` (see :func:`keep_ratio_size`).

    Args:
        min_size: the short side in pixels, or ``(lo, hi)``: an integer drawn uniformly from
            ``[lo, hi]`` (both included) for each call, as the release's "range" multi-scale.
        max_size: cap on the long side in pixels.
        antialias: low-pass when shrinking (bilinear interpolation in both cases).
    """

    def __init__(
        self, min_size: int | Sequence[int], max_size: int, antialias: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(min_size, Sequence):
            min_size = (min_size, min_size)
        lo, hi = (int(s) for s in min_size)
        if not 0 < lo <= hi:
            raise ValueError(f"min_size must be positive with lo <= hi, got {min_size}")
        self.min_size = (lo, hi)
        self.max_size = int(max_size)
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        lo, hi = self.min_size
        short = lo if lo == hi else int(torch.randint(lo, hi + 1, ()).item())
        height, width = v2.query_size(flat_inputs)
        return {"size": list(keep_ratio_size(height, width, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR,
            antialias=self.antialias,
        )


class SanitizeBoxes(torch.nn.Module):
    """``v2.SanitizeBoundingBoxes`` on ``target["boxes"]`` (with ``labels`` and, when present,
    the instance ``masks``, which follow their boxes) and, separately, on
    ``target["ignore_boxes"]``.

    v2's transform computes its keep-mask from the *first* ``BoundingBoxes`` of a sample and
    applies it to every one, which is wrong for a second, unrelated box set; hence one call
    per set. Boxes are first clamped to the image. Called as ``(image, target)``.
    """

    def __init__(self, min_size: float = 1.0) -> None:
        super().__init__()
        self.clamp = v2.ClampBoundingBoxes()
        self.with_labels = v2.SanitizeBoundingBoxes(min_size=min_size)  # finds "labels"
        self.alone = v2.SanitizeBoundingBoxes(min_size=min_size, labels_getter=None)

    def forward(self, image: Any, target: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        target = dict(target)
        sample = {"boxes": self.clamp(target["boxes"]), "labels": target["labels"]}
        if "masks" in target:
            sample["masks"] = target["masks"]  # a tv_tensors.Mask: v2 filters it too
        kept = self.with_labels(sample)
        target.update(kept)
        if "ignore_boxes" in target:
            target["ignore_boxes"] = self.alone(self.clamp(target["ignore_boxes"]))
        return image, target


def build_transforms(
    train: bool,
    *,
    min_size: int | Sequence[int] | None = 800,
    max_size: int = 1333,
    flip: bool = True,
) -> v2.Compose:
    """The transform of a split, called as ``transforms(image, target)``.

    Args:
        train: training adds flipping (if ``flip``) and drops degenerate boxes.
        min_size: short side in pixels, ``(lo, hi)`` for multi-scale, or None for no resize
            (evaluation: the model resizes inside, so only the dtype changes).
        max_size: cap on the long side in pixels.
        flip: random horizontal flip with probability 0.5 (training only).

    Input image: uint8 3 x H x W; output: float32 in [0, 1], 3 x H' x W', with boxes (and
    ``ignore_boxes``) in the output's pixels; instance ``masks`` (``tv_tensors.Mask``
    G x H x W) are resized (nearest) and flipped with the image and stay uint8.
    """
    steps: list[Any] = []
    if min_size is not None:
        steps.append(KeepRatioResize(min_size, max_size))
    if train:
        if flip:
            steps.append(v2.RandomHorizontalFlip(0.5))
        steps.append(SanitizeBoxes())
    steps.append(v2.ToDtype(torch.float32, scale=True))  # images only; boxes stay float32
    return v2.Compose(steps)


def collate(
    batch: list[tuple[Tensor, dict[str, Any]]], size_divisible: int = 32
) -> tuple[Tensor, list[tuple[int, int]], list[dict[str, Any]]]:
    """Normalise, pad and stack a list of ``(image, target)`` samples.

    Each image (float in [0, 1], or uint8 in [0, 255]) becomes ``(255 * x - PIXEL_MEAN) /
    PIXEL_STD`` and is zero-padded at the bottom and right (after normalisation, as the
    release) to the batch's largest height and width, rounded up to ``size_divisible``.

    Returns:
        images: B x 3 x H x W float32.
        image_sizes: the unpadded (h, w) of each image.
        targets: dicts of plain tensors: ``boxes`` (G, 4) float32 x1y1x2y2 in the (resized)
            image's pixels, ``labels`` (G,) int64, ``ignore_boxes`` (K, 4) float32,
            ``image_id`` int, ``orig_size`` (H, W) of the decoded file, ``size`` (h, w);
            and ``masks`` (G, H, W) uint8 when the samples have them, zero-padded like the
            images to the batch's H x W.
    """
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img, _ in batch]
    height = -(-max(h for h, _ in sizes) // size_divisible) * size_divisible
    width = -(-max(w for _, w in sizes) // size_divisible) * size_divisible

    images = []
    targets = []
    for (img, target), (h, w) in zip(batch, sizes, strict=True):
        img = img.as_subclass(Tensor)
        img = img.float() * 255.0 if img.is_floating_point() else img.float()
        img = (img - mean) / std
        images.append(nnf.pad(img, (0, width - w, 0, height - h), value=0.0))
        out = {k: _plain(v) for k, v in target.items()}
        out["size"] = (h, w)
        if "masks" in out:
            m = out["masks"]
            out["masks"] = nnf.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2]))
        targets.append(out)
    return torch.stack(images), sizes, targets


def _plain(value: Any) -> Any:
    if isinstance(value, tv_tensors.TVTensor):
        return value.as_subclass(Tensor)
    return value
