"""Digits: a small, real-data detection dataset, generated in under a minute, no download.

The objects are the 1,797 handwritten digits bundled with scikit-learn
(``sklearn.datasets.load_digits``: 8x8 pixels, 17 grey levels 0..16, classes 0-9, written by
43 people). Each digit is upscaled (bicubic) to a random size, given a random ink colour that
contrasts with the background, and alpha-composited onto an RGB canvas of 256-384 px a side,
using its intensity as alpha. Backgrounds are random crops of the two photographs bundled
with scikit-learn (``china.jpg``, ``flower.jpg``), partly desaturated and squeezed into a dark
or a light band of grey levels so the ink always stands out, plus grey Gaussian noise.

Two variants:

- ``sparse``: 2-6 digits (28-72 px tall) per image, never touching (box IoU 0).
- ``crowd``: 8-20 digits (24-64 px tall) per image, placed in clusters where each digit is
  offset from a neighbour by 0.2-0.55 of the neighbour's box width and height, so about 90%
  of the digits overlap another and ~40% of overlapping pairs have box IoU 0.3-0.7: the
  situation one-to-few assignment is about.

Occlusion is tracked per digit: a digit's *visible* ink is its alpha times the transparency of
every digit pasted after it, and a pixel counts as ink when that visible alpha is above
``INK_THRESHOLD``. Boxes are the tight box of the visible ink (so an occluded digit's box
shrinks to what can be seen) and the COCO ``segmentation`` is that visible-ink mask as RLE.
A digit keeps its annotation only while at least ``MIN_VISIBLE`` of its ink is visible; the
crowd placement rejects a position that would push any digit below that, so hidden ink is
never left unannotated in practice, and the final filter is the guarantee.

Train and val use disjoint digit instances: the 1,797 sklearn indices are split once, 80/20
stratified by class with a fixed seed (:func:`digit_split`), whatever ``seed`` is given.
Every image draws from its own generator seeded by (seed, variant, split, image number), so
output is byte-for-byte deterministic and the first k images do not depend on how many are
generated.

Layout written by :func:`make_digits`::

    fmt="coco":  out_dir/train/train_000000.png ...   out_dir/annotations/train.json
                 out_dir/val/val_000000.png ...       out_dir/annotations/val.json
    fmt="odgt":  out_dir/Images/train_000000.png ...  out_dir/annotations/train.odgt
                 out_dir/Images/val_000000.png ...    out_dir/annotations/val.odgt

COCO boxes are ``[x, y, w, h]`` in integer pixels (the box covers pixel columns x..x+w-1);
``area`` is the number of visible-ink pixels; each annotation also carries ``digit_index``,
the source index into ``load_digits()``. The odgt files follow CrowdHuman (one JSON object
per line, every box tagged ``"person"``, ``fbox == vbox`` == the visible box), except that
the images are ``.png``, not ``.jpg``, and each line also has ``width`` and ``height``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

INK_THRESHOLD = 0.25  # visible alpha above which a pixel counts as a digit's ink
MIN_VISIBLE = 0.6  # fraction of a digit's ink that must stay visible to keep its annotation
CANVAS_SIDE = (256, 384)  # inclusive range of image width and height, pixels
CANVAS_STEP = 32  # sides are multiples of this, so batches of like images need no padding
CROWD_OFFSET = (0.2, 0.55)  # crowd: shift from a neighbour, in units of its box width/height
CROWD_NEW_CLUSTER = 0.15  # crowd: chance that a digit starts a new cluster
CROWD_MAX_TOUCHING = 2  # crowd: most digits a new one may overlap

_VARIANTS = {
    # digits per image, digit height range (px), default number of train / val images
    "sparse": {"count": (2, 6), "size": (28, 72), "num": (600, 150)},
    "crowd": {"count": (8, 20), "size": (24, 64), "num": (600, 150)},
}
_SPLITS = ("train", "val")
_SPLIT_SEED = 20230618  # fixed: the train/val digit instances never change with `seed`
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# The 8x8 digit is padded by one blank pixel before upscaling, so its ink fades out
# inside the pasted window instead of being cut at the window's edge.
_PAD = 1


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 intensities in [0, 1] and (1797,) int64 labels 0-9."""
    # Imported here: scikit-learn is an optional dependency (the ``data`` extra).
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


@lru_cache(maxsize=1)
def _photos() -> tuple[Image.Image, ...]:
    """The two RGB photographs (427x640) bundled with scikit-learn."""
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(img) for img in load_sample_images().images)


def digit_split(val_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """Split the sklearn digit indices into disjoint train / val sets, stratified by class.

    The split uses a fixed seed, so it is the same for every call and every dataset seed.

    Returns:
        ``{"train": (~1437,) int64, "val": (~360,) int64}``, sorted indices into
        ``sklearn.datasets.load_digits()``.
    """
    _, labels = _digits()
    rng = np.random.default_rng(_SPLIT_SEED)
    val = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[: round(val_fraction * len(idx))])
    val_idx = np.sort(np.concatenate(val))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return {"train": train_idx, "val": val_idx}


@dataclass
class _Digit:
    """One rendered digit; ``alpha`` and ``visible`` are (h, w) float32 over its window."""

    index: int  # into load_digits()
    label: int
    size: float  # nominal digit height, pixels (the 8x8 cell, without padding)
    alpha: np.ndarray  # ink alpha as pasted
    visible: np.ndarray  # alpha x transparency of every digit pasted later
    ink: int  # number of pixels with alpha > INK_THRESHOLD
    ink_box: tuple[int, int, int, int]  # tight x1y1x2y2 box of that ink within the window
    x: int = 0  # window's top-left corner on the canvas, pixels
    y: int = 0

    @property
    def h(self) -> int:
        return self.alpha.shape[0]

    @property
    def w(self) -> int:
        return self.alpha.shape[1]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Tight x1y1x2y2 box of the unoccluded ink on the canvas, pixels."""
        x0, y0, x1, y1 = self.ink_box
        return self.x + x0, self.y + y0, self.x + x1, self.y + y1

    def centre_at(self, cx: float, cy: float) -> None:
        self.x, self.y = round(cx - self.w / 2), round(cy - self.h / 2)

    def visible_fraction(self) -> float:
        return float((self.visible > INK_THRESHOLD).sum()) / self.ink


def _overlap(a: _Digit, b: _Digit) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Slices of a's and b's windows covering their common canvas region, or None."""
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    if x0 >= x1 or y0 >= y1:
        return None
    sa = (slice(y0 - a.y, y1 - a.y), slice(x0 - a.x, x1 - a.x))
    sb = (slice(y0 - b.y, y1 - b.y), slice(x0 - b.x, x1 - b.x))
    return sa, sb


def _render_digit(image8: np.ndarray, height: float, width: float) -> np.ndarray:
    """Upscale an (8, 8) intensity image to an alpha window of about (height, width) * 10/8.

    Upscaled 8x8 strokes are blurry and fat; mapping intensity 0.3..0.75 to alpha 0..1 (and
    clipping the bicubic overshoot) thins and firms them into pen-like strokes, which keeps
    overlapping digits apart; a lower end much above 0.3 starts breaking thin loops.
    """
    padded = np.pad(image8, _PAD)
    scale_h, scale_w = height / 8, width / 8
    out_w = max(1, round(padded.shape[1] * scale_w))
    out_h = max(1, round(padded.shape[0] * scale_h))
    big = Image.fromarray(padded).resize((out_w, out_h), Image.Resampling.BICUBIC)
    return np.clip((np.asarray(big, dtype=np.float32) - 0.3) / 0.45, 0.0, 1.0)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, bool]:
    """A textured, dimmed photo crop: (H, W, 3) float32 in [0, 255], and whether it is dark.

    The crop's grey levels are squeezed into a band 50-90 levels wide at the dark or the
    light end, and the ink is drawn from the other end, so contrast is at least ~65 levels.
    """
    photo = _photos()[rng.integers(len(_photos()))]
    pw, ph = photo.size
    # A crop with the canvas's aspect ratio, between a quarter and all of the photo's height.
    ch = rng.uniform(0.25, 1.0) * ph
    cw = min(pw, ch * width / height)
    ch = cw * height / width
    cx, cy = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
    crop = photo.resize((width, height), Image.Resampling.BILINEAR, box=(cx, cy, cx + cw, cy + ch))
    img = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    grey = img @ _LUMA
    img = grey[..., None] + rng.uniform(0.0, 0.5) * (img - grey[..., None])
    lo_p, hi_p = np.percentile(grey[::4, ::4], [1, 99])  # a subsample is plenty
    dark = bool(rng.random() < 0.5)
    band = rng.uniform(50, 90)
    lo = rng.uniform(0, 30) if dark else rng.uniform(225, 255) - band
    img = lo + (img - lo_p) * (band / max(hi_p - lo_p, 1.0))
    return np.clip(img, lo, lo + band), dark


def _ink_colour(rng: np.random.Generator, dark_background: bool) -> np.ndarray:
    """(3,) float32 RGB with luma about 185-250 on dark backgrounds, 5-70 on light ones."""
    target = rng.uniform(185, 250) if dark_background else rng.uniform(5, 70)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    colour = base - base.mean()
    colour *= rng.uniform(0.2, 0.9)
    for _ in range(3):  # clipping moves the luma; a few corrections bring it back
        colour = np.clip(colour + (target - colour @ _LUMA), 0, 255)
    return colour


def _make_digit(rng: np.random.Generator, index: int, size: float) -> _Digit:
    """Render sklearn digit ``index`` at nominal height ``size`` (placed at the origin)."""
    images, labels = _digits()
    alpha = _render_digit(images[index], size, size * rng.uniform(0.8, 1.1))
    ink = alpha > INK_THRESHOLD
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return _Digit(
        index=int(index),
        label=int(labels[index]),
        size=size,
        alpha=alpha,
        visible=alpha.copy(),
        ink=int(ink.sum()),
        ink_box=(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1),
    )


def _fits(d: _Digit, width: int, height: int) -> bool:
    return d.x >= 0 and d.y >= 0 and d.x + d.w <= width and d.y + d.h <= height


def _keeps_others_visible(new: _Digit, placed: list[_Digit]) -> bool:
    """Whether pasting ``new`` on top leaves >= MIN_VISIBLE of every placed digit's ink."""
    for d in placed:
        ov = _overlap(d, new)
        if ov is None:
            continue
        vis = d.visible.copy()
        vis[ov[0]] *= 1.0 - new.alpha[ov[1]]
        if (vis > INK_THRESHOLD).sum() < MIN_VISIBLE * d.ink:
            return False
    return True


def _paste(new: _Digit, placed: list[_Digit]) -> None:
    """Put ``new`` on top of ``placed``: it hides part of every digit it overlaps."""
    for d in placed:
        ov = _overlap(d, new)
        if ov is not None:
            d.visible[ov[0]] *= 1.0 - new.alpha[ov[1]]
    placed.append(new)


def _place_sparse(
    rng: np.random.Generator, pool: np.ndarray, width: int, height: int
) -> list[_Digit]:
    """2-6 digits whose windows (hence ink boxes) are at least 2 px apart."""
    lo, hi = _VARIANTS["sparse"]["count"]
    smin, smax = _VARIANTS["sparse"]["size"]
    n = int(rng.integers(lo, hi + 1))
    placed: list[_Digit] = []
    for index in rng.choice(pool, size=n, replace=False):
        d = _make_digit(rng, index, rng.uniform(smin, smax))
        for _ in range(50):
            d.centre_at(rng.uniform(0, width), rng.uniform(0, height))
            if _fits(d, width, height) and all(
                d.x >= o.x + o.w + 2
                or o.x >= d.x + d.w + 2
                or d.y >= o.y + o.h + 2
                or o.y >= d.y + d.h + 2
                for o in placed
            ):
                _paste(d, placed)
                break
    return placed


def _ink_box_iou(d: _Digit, boxes: np.ndarray) -> np.ndarray:
    """(K,) IoU of d's unoccluded ink box with (K, 4) x1y1x2y2 ``boxes``."""
    x0, y0, x1, y1 = d.box
    iw = np.clip(np.minimum(x1, boxes[:, 2]) - np.maximum(x0, boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(y1, boxes[:, 3]) - np.maximum(y0, boxes[:, 1]), 0, None)
    inter = iw * ih
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / ((x1 - x0) * (y1 - y0) + areas - inter)


def _place_crowd(
    rng: np.random.Generator, pool: np.ndarray, width: int, height: int
) -> list[_Digit]:
    """8-20 digits in 2-4 clusters, most offset from a placed neighbour by a fraction of it.

    A neighbour of similar size (x0.85-1.15) shifted by CROWD_OFFSET of its ink box's width
    and height (in a random direction) is what makes box IoUs of 0.3-0.7 common. A candidate
    position is rejected when it would hide more than 1 - MIN_VISIBLE of any digit's ink (so
    occluded digits stay annotated), when it would overlap more than CROWD_MAX_TOUCHING
    digits (a pile of digits on one spot is unreadable), or when its box would nearly
    coincide (IoU > 0.75) with another's.
    """
    lo, hi = _VARIANTS["crowd"]["count"]
    smin, smax = _VARIANTS["crowd"]["size"]
    n = int(rng.integers(lo, hi + 1))
    num_clusters = int(rng.integers(2, 5))
    indices = rng.choice(pool, size=4 * hi, replace=False)
    placed: list[_Digit] = []
    for index in indices:
        if len(placed) == n:
            break
        new_cluster = len(placed) < num_clusters or rng.random() < CROWD_NEW_CLUSTER
        if new_cluster:
            d = _make_digit(rng, index, rng.uniform(smin, smax))
        else:
            nb = placed[rng.integers(len(placed))]
            d = _make_digit(
                rng, index, float(np.clip(nb.size * rng.uniform(0.85, 1.15), smin, smax))
            )
            x0, y0, x1, y1 = nb.box
        boxes = np.array([o.box for o in placed]).reshape(-1, 4)
        # Rendering is the costly part, so a rejected digit is only moved, not redrawn.
        for _ in range(10):
            if new_cluster:
                d.centre_at(rng.uniform(0, width), rng.uniform(0, height))
            else:
                angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(*CROWD_OFFSET)
                d.centre_at(
                    (x0 + x1) / 2 + r * np.cos(angle) * (x1 - x0),
                    (y0 + y1) / 2 + r * np.sin(angle) * (y1 - y0),
                )
            if not _fits(d, width, height):
                continue
            ious = _ink_box_iou(d, boxes)
            if (
                (ious <= 0.75).all()
                and (ious > 0).sum() <= CROWD_MAX_TOUCHING
                and _keeps_others_visible(d, placed)
            ):
                _paste(d, placed)
                break
    return placed


def _render_image(
    rng: np.random.Generator, variant: str, pool: np.ndarray
) -> tuple[np.ndarray, list[_Digit]]:
    """One image: (H, W, 3) uint8 and its pasted digits, back to front, occlusion applied."""
    lo, hi = (side // CANVAS_STEP for side in CANVAS_SIDE)
    width, height = (int(v) * CANVAS_STEP for v in rng.integers(lo, hi + 1, size=2))
    canvas, dark = _background(rng, width, height)
    place = _place_sparse if variant == "sparse" else _place_crowd
    digits = place(rng, pool, width, height)
    for d in digits:
        a = d.alpha[..., None]
        window = canvas[d.y : d.y + d.h, d.x : d.x + d.w]
        window[:] = window * (1.0 - a) + a * _ink_colour(rng, dark)
    # Grey (luminance) sensor noise: colour noise would triple the PNG size for no benefit.
    noise = rng.standard_normal(canvas.shape[:2], dtype=np.float32) * rng.uniform(1.5, 5)
    canvas += noise[..., None]
    return np.clip(canvas, 0, 255).round().astype(np.uint8), digits


def _annotate(d: _Digit, width: int, height: int) -> dict:
    """Visible-ink box, RLE and area of one digit (COCO fields, without ids)."""
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    ink = d.visible > INK_THRESHOLD
    mask[d.y : d.y + d.h, d.x : d.x + d.w] = ink
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    x0, y0 = d.x + int(cols[0]), d.y + int(rows[0])
    bbox = [x0, y0, d.x + int(cols[-1]) + 1 - x0, d.y + int(rows[-1]) + 1 - y0]
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return {"bbox": bbox, "area": int(ink.sum()), "segmentation": rle}


def _categories(single_class: bool) -> list[dict]:
    if single_class:
        return [{"id": 1, "name": "digit", "supercategory": "digit"}]
    return [{"id": c + 1, "name": str(c), "supercategory": "digit"} for c in range(10)]


def _write_image(job: tuple[tuple[int, ...], Path], variant: str, pool: np.ndarray
                 ) -> tuple[int, int, list[tuple[int, int, dict]]]:
    """Render the image ``job = (key, path)`` (``key``: its RNG seed) and save it as a PNG at
    ``path``. Returns its width, height and, per digit visible enough to keep, the digit's
    label, sklearn index and COCO fields."""
    key, path = job
    pixels, digits = _render_image(np.random.default_rng(list(key)), variant, pool)
    height, width = pixels.shape[:2]
    # Level 1: noise makes the PNGs barely compressible, and level 6 costs twice the time.
    Image.fromarray(pixels).save(path, compress_level=1)
    return width, height, [(d.label, d.index, _annotate(d, width, height))
                           for d in digits if d.visible_fraction() >= MIN_VISIBLE]


def _records(stems: list[str], rendered: Iterable[tuple[int, int, list]], single_class: bool
             ) -> tuple[list[dict], list[dict], list[str]]:
    """COCO images and annotations and odgt lines of one split, from ``_write_image``'s
    results in image order."""
    images, annotations, odgt_lines = [], [], []
    for i, (stem, (width, height, kept)) in enumerate(zip(stems, rendered, strict=True)):
        image_id = i + 1  # COCOeval treats id 0 as "unmatched": ids start at 1
        images.append({"id": image_id, "file_name": f"{stem}.png", "width": width,
                       "height": height})
        gtboxes = []
        for label, index, ann in kept:
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1 if single_class else label + 1,
                "bbox": ann["bbox"],
                "area": ann["area"],
                "iscrowd": 0,
                "segmentation": ann["segmentation"],
                "digit_index": index,
            })
            gtboxes.append({
                "tag": "person",
                "fbox": ann["bbox"],
                "vbox": ann["bbox"],
                "extra": {"ignore": 0, "digit_index": index},
            })
        odgt_lines.append(json.dumps(
            {"ID": stem, "width": width, "height": height, "gtboxes": gtboxes}))
    return images, annotations, odgt_lines


@contextmanager
def _process_pool(workers: int) -> Iterator[Any]:
    """A process pool of ``workers``, or None for one (render in this process). Forked where
    the platform allows, so the workers share the digits and photos loaded here."""
    if workers <= 1:
        yield None
        return
    _digits(), _photos()
    methods = multiprocessing.get_all_start_methods()
    with multiprocessing.get_context("fork" if "fork" in methods else None).Pool(workers) as p:
        yield p


def _worker_count(workers: int | None) -> int:
    if workers is not None:
        return max(1, workers)
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def make_digits(
    out_dir: str | Path,
    *,
    variant: str = "sparse",
    seed: int = 0,
    num_train: int | None = None,
    num_val: int | None = None,
    fmt: str = "coco",
    single_class: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Path]:
    """Generate the Digits detection dataset (see the module docstring) under ``out_dir``.

    Args:
        out_dir: destination folder, created if missing; existing files of the same names
            are overwritten, others are left alone.
        variant: ``"sparse"`` (2-6 separated digits) or ``"crowd"`` (8-20, overlapping).
        seed: dataset seed; the same seed gives identical PNG and annotation bytes.
        num_train, num_val: number of images; default 600 and 150.
        fmt: ``"coco"`` (``annotations/{split}.json``, images in ``{split}/``) or ``"odgt"``
            (CrowdHuman lines in ``annotations/{split}.odgt``, all images in ``Images/``).
        single_class: one category (id 1, ``"digit"``) instead of ids 1-10 for "0"-"9".
        progress: show a tqdm progress bar per split.
        workers: processes rendering images (default: the usable cores, at most 4); the
            output does not depend on it (each image has its own RNG seed).

    Returns:
        ``{"train_images", "val_images", "train_annotations", "val_annotations"}``: the image
        folders (both ``out_dir/Images`` for odgt) and annotation files written.
    """
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {sorted(_VARIANTS)}, got {variant!r}")
    if fmt not in ("coco", "odgt"):
        raise ValueError(f"fmt must be 'coco' or 'odgt', got {fmt!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out_dir = Path(out_dir)
    default_train, default_val = _VARIANTS[variant]["num"]
    nums = {
        "train": default_train if num_train is None else num_train,
        "val": default_val if num_val is None else num_val,
    }
    pools = digit_split()
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    variant_code = list(_VARIANTS).index(variant)
    written: dict[str, Path] = {}
    with _process_pool(_worker_count(workers)) as processes:
        for split_code, split in enumerate(_SPLITS):
            image_dir = out_dir / ("Images" if fmt == "odgt" else split)
            image_dir.mkdir(parents=True, exist_ok=True)
            stems = [f"{split}_{i:06d}" for i in range(nums[split])]
            jobs = [((seed, variant_code, split_code, i), image_dir / f"{stem}.png")
                    for i, stem in enumerate(stems)]
            render = partial(_write_image, variant=variant, pool=pools[split])
            done = processes.imap(render, jobs, chunksize=8) if processes else map(render, jobs)
            images, annotations, odgt_lines = _records(
                stems, tqdm(done, total=len(jobs), desc=f"digits {variant} {split}",
                            disable=not progress), single_class)
            if fmt == "coco":
                ann_path = out_dir / "annotations" / f"{split}.json"
                coco = {
                    "info": {"description": f"Digits ({variant}, seed {seed})", "version": "1.0"},
                    "licenses": [],
                    "images": images,
                    "annotations": annotations,
                    "categories": _categories(single_class),
                }
                ann_path.write_text(json.dumps(coco))
            else:
                ann_path = out_dir / "annotations" / f"{split}.odgt"
                ann_path.write_text("".join(line + "\n" for line in odgt_lines))
            written[f"{split}_images"] = image_dir
            written[f"{split}_annotations"] = ann_path
    return written


def _box_iou(boxes: np.ndarray) -> np.ndarray:
    """(G, G) IoU of (G, 4) ``[x, y, w, h]`` boxes."""
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    inter = iw * ih
    area = boxes[:, 2] * boxes[:, 3]
    return inter / (area[:, None] + area - inter)


def summarize(ann_file: str | Path) -> dict:
    """Statistics of a COCO Digits annotation file, for reports and sanity checks.

    Returns a dict with ``num_images``, ``digits_per_image`` (mean / min / max),
    ``box_width`` and ``box_height`` (mean and 5/50/95th percentiles, pixels),
    ``overlapping_pairs`` (same-image box pairs with IoU > 0), ``iou_hist`` (counts of those
    pairs' IoU in bins of 0.1 from 0 to 1) and ``frac_iou_0.3_0.7`` among them.
    """
    coco = json.loads(Path(ann_file).read_text())
    by_image: dict[int, list[list[int]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann["bbox"])
    counts = np.array([len(b) for b in by_image.values()])
    ious = []
    for boxes in by_image.values():
        if len(boxes) > 1:
            iou = _box_iou(np.asarray(boxes, dtype=np.float64))
            ious.append(iou[np.triu_indices(len(boxes), k=1)])
    ious_all = np.concatenate(ious) if ious else np.zeros(0)
    overlapping = ious_all[ious_all > 0]
    wh = np.array([a["bbox"][2:] for a in coco["annotations"]], dtype=np.float64).reshape(-1, 2)

    def describe(v: np.ndarray) -> dict[str, float]:
        if len(v) == 0:
            return {}
        p5, p50, p95 = np.percentile(v, [5, 50, 95])
        return {"mean": float(v.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95)}

    hist, _ = np.histogram(overlapping, bins=10, range=(0.0, 1.0))
    in_band = (overlapping >= 0.3) & (overlapping <= 0.7)
    return {
        "num_images": len(by_image),
        "digits_per_image": {
            "mean": float(counts.mean()) if len(counts) else 0.0,
            "min": int(counts.min()) if len(counts) else 0,
            "max": int(counts.max()) if len(counts) else 0,
        },
        "box_width": describe(wh[:, 0]),
        "box_height": describe(wh[:, 1]),
        "overlapping_pairs": int(len(overlapping)),
        "iou_hist": hist.tolist(),
        "frac_iou_0.3_0.7": float(in_band.mean()) if len(overlapping) else 0.0,
    }
