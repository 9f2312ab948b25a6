"""COCO-format detection data: validation of the files, then a map-style dataset.

Data flow: ``validate_coco`` reads the annotation JSON and checks it (and the image folder)
once, failing with a message that names the file and the problem; ``CocoDetection`` then
turns every annotation into an x1y1x2y2 box in pixels, clipped to its image, with a
contiguous 0-based label, and serves ``(image, target)`` pairs:

- image: ``tv_tensors.Image``, uint8, 3 x H x W, RGB, EXIF orientation applied;
- target: ``boxes`` (``tv_tensors.BoundingBoxes`` G x 4, XYXY, float32, pixels),
  ``labels`` (G,) int64 in [0, num_classes), ``image_id`` (int), ``orig_size`` ((H, W) of the
  decoded image), ``ignore_boxes`` (``BoundingBoxes`` K x 4: the ``iscrowd`` regions with
  ``ignore_mode="exclude"``, always 0 x 4 with the default ``"drop"``); with
  ``with_masks=True`` also ``masks`` (``tv_tensors.Mask`` G x H x W uint8, 1 inside), the
  ``segmentation`` of each box's annotation (polygons or RLE, through pycocotools), in the
  same order as ``boxes``.

Crowd annotations are dropped by default, as in the authors' release (points inside them are
plain negatives); ``ignore_mode="exclude"`` returns them so the loss can leave those points
out (docs/algorithm.md section 5).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

__all__ = [
    "CocoDetection",
    "DatasetError",
    "ImageReadError",
    "load_image",
    "validate_coco",
]

_SHOWN = 5  # how many offending ids / file names an error message lists
_REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id",),
}
# Everything PIL raises for a file it cannot decode (truncated data, bad markers, ...).
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError
)


class DatasetError(ValueError):
    """An annotation file or image folder that cannot be used as given; the message names
    the file and the problem."""


class ImageReadError(OSError):
    """An image file that cannot be decoded; the message names the file."""


# --------------------------------------------------------------------------------------------
# validation


def _first(items: Sequence[Any], n: int = _SHOWN) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (", ..." if len(items) > n else "")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _load_json(ann_file: Path) -> Any:
    try:
        with open(ann_file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{ann_file}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{ann_file}: not UTF-8 text ({e})") from None


def _check_structure(data: Any, where: Path) -> None:
    if not isinstance(data, dict):
        raise DatasetError(
            f"{where}: the top level must be a JSON object with keys "
            f"'images', 'annotations', 'categories', got {type(data).__name__}"
        )
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise DatasetError(f"{where}: missing top-level key(s) {_first(missing, 3)}")
    for key, fields in _REQUIRED.items():
        records = data[key]
        if not isinstance(records, list):
            raise DatasetError(f"{where}: '{key}' must be a list, got {type(records).__name__}")
        bad = []
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                bad.append(f"#{i} is not an object")
                continue
            lacking = [f for f in fields if f not in rec]
            if lacking:
                bad.append(f"#{i} (id={rec.get('id')}) lacks {', '.join(map(repr, lacking))}")
        if bad:
            raise DatasetError(
                f"{where}: {len(bad)} of {len(records)} {key} records miss required keys: "
                f"{'; '.join(bad[:_SHOWN])}{'; ...' if len(bad) > _SHOWN else ''}"
            )


def _check_ids(data: dict, where: Path) -> None:
    for key in ("images", "categories", "annotations"):
        not_int = [r["id"] for r in data[key]
                   if not isinstance(r["id"], int) or isinstance(r["id"], bool)]
        if not_int:
            raise DatasetError(
                f"{where}: {len(not_int)} {key} ids are not integers: {_first(not_int)}"
            )
        counts = Counter(r["id"] for r in data[key])
        dup = [i for i, c in counts.items() if c > 1]
        if dup:
            raise DatasetError(f"{where}: {len(dup)} duplicate {key} ids: {_first(dup)}")

    bad_size = [r["id"] for r in data["images"]
                if not (_is_number(r["width"]) and _is_number(r["height"])
                        and r["width"] > 0 and r["height"] > 0)]
    if bad_size:
        raise DatasetError(
            f"{where}: {len(bad_size)} images without a positive width/height: "
            f"image ids {_first(bad_size)}"
        )

    anns = data["annotations"]
    image_ids = {r["id"] for r in data["images"]}
    cat_ids = {r["id"] for r in data["categories"]}
    for field, known, what in (("image_id", image_ids, "image"),
                               ("category_id", cat_ids, "category")):
        unknown = [a[field] for a in anns
                   if not isinstance(a[field], int) or isinstance(a[field], bool)
                   or a[field] not in known]
        if unknown:
            uniq = list(dict.fromkeys(repr(u) for u in unknown))
            raise DatasetError(
                f"{where}: {len(unknown)} annotations refer to unknown {what} ids "
                f"(first: {_first(uniq)})"
            )

    bad_box = [a["id"] for a in anns
               if not (isinstance(a["bbox"], (list, tuple)) and len(a["bbox"]) == 4
                       and all(_is_number(v) for v in a["bbox"]))]
    if bad_box:
        raise DatasetError(
            f"{where}: {len(bad_box)} annotations whose bbox is not 4 finite numbers "
            f"[x, y, w, h]: annotation ids {_first(bad_box)}"
        )


def _header_error(path: Path) -> str | None:
    """None if PIL can open ``path`` and verify it, else a short reason."""
    try:
        with Image.open(path) as im:
            im.verify()  # JPEG: header and markers; PNG: every chunk's CRC
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"
        return f"{type(e).__name__}: {e}"
    return None


def _check_files(images: list[dict], img_dir: Path, where: Path, check_images: bool) -> None:
    if not img_dir.is_dir():
        raise DatasetError(f"{where}: image folder {img_dir} does not exist")
    # One listing per folder instead of one stat() per image: cheap even for 118k images.
    listings: dict[Path, set[str]] = {}
    missing = []
    for rec in images:
        path = img_dir / rec["file_name"]
        if path.parent not in listings:
            listings[path.parent] = set(os.listdir(path.parent)) if path.parent.is_dir() else set()
        if path.name not in listings[path.parent]:
            missing.append(str(rec["file_name"]))
    if missing:
        raise DatasetError(
            f"{where}: {len(missing)} of {len(images)} images not found in {img_dir}: "
            f"{_first(missing)}"
        )
    if not check_images or not images:
        return

    # Opening headers is I/O bound on cold caches and network disks: threads overlap the
    # reads. Work goes out in chunks, so with warm caches it costs no more than a plain loop.
    names = [str(r["file_name"]) for r in images]
    chunks = [names[i:i + 64] for i in range(0, len(names), 64)]
    bar = tqdm(total=len(names), desc="checking images", unit="img", leave=False,
               disable=True if len(names) < 2000 else None)
    errors = []
    with ThreadPoolExecutor(max_workers=8) as pool, bar:
        for chunk, errs in zip(
            chunks, pool.map(lambda c: [_header_error(img_dir / n) for n in c], chunks),
            strict=True,
        ):
            bar.update(len(chunk))
            errors += [f"{n} ({e})" for n, e in zip(chunk, errs, strict=True) if e is not None]
    if errors:
        raise DatasetError(
            f"{where}: {len(errors)} of {len(images)} images in {img_dir} cannot be read: "
            f"{'; '.join(errors[:_SHOWN])}{'; ...' if len(errors) > _SHOWN else ''}"
        )


def validate_coco(
    ann_file: str | os.PathLike, img_dir: str | os.PathLike, *, check_images: bool = True,
    data: dict | None = None,
) -> dict:
    """Load a COCO annotation file and check it against the image folder.

    Checks, in order: the JSON parses (the error gives line and column); the top-level keys
    ``images``, ``annotations``, ``categories`` and each record's required keys exist; ids are
    unique; every annotation's ``image_id`` and ``category_id`` is known; every ``bbox`` is 4
    finite numbers; every image file exists (one directory listing per folder, so this is
    cheap for all images). With ``check_images`` every file is also opened with PIL and
    verified (header readable; for PNG every chunk checked): threads overlap the reads and a
    progress bar shows for large sets. This costs about 0.1 ms per JPEG from a warm cache
    (some 10 s for COCO train2017) and more from a cold or network disk; pass
    ``check_images=False`` to skip it (a file broken later still raises
    :class:`ImageReadError` when it is read).

    ``data``, when given, is checked instead of reading ``ann_file`` (the records another
    format's reader built from ``ann_file``, see :mod:`o2f.data.formats`); messages still
    name ``ann_file``.

    Returns:
        The parsed JSON (a dict with at least ``images``, ``annotations``, ``categories``).

    Raises:
        DatasetError: (a ``ValueError``) naming ``ann_file`` and the problem, with a count and
            the first few offending ids or file names.
        FileNotFoundError: when ``ann_file`` does not exist.
    """
    where = Path(ann_file)
    if data is None:
        data = _load_json(where)
    _check_structure(data, where)
    _check_ids(data, where)
    _check_files(data["images"], Path(img_dir), where, check_images)
    return data


# --------------------------------------------------------------------------------------------
# decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit integers are scaled (65535 -> 255), not clipped;
    alpha is dropped (as OpenCV's colour decoding does)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # "I;16", "I;16B", "I;16L": 16-bit; "I": 16-bit PNG in a 32-bit int
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_image(path: str | os.PathLike) -> tv_tensors.Image:
    """Decode one image file to a 3 x H x W uint8 RGB ``tv_tensors.Image``.

    The EXIF orientation is applied, so H x W is the size of the image as displayed.
    Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.

    Raises:
        ImageReadError: (an ``OSError``) naming the file, when it cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)  # also loads the pixels: decode errors show here
            rgb = _to_rgb(im)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: image file not found") from e
    except _DECODE_ERRORS as e:
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return tv_tensors.Image(F.pil_to_tensor(rgb))


# --------------------------------------------------------------------------------------------
# dataset


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset (see the module docstring for the sample layout).

    Args:
        ann_file: COCO instances JSON.
        img_dir: folder the images' ``file_name`` are relative to.
        transforms: called as ``transforms(image, target)`` (e.g. from
            :func:`o2f.data.transforms.build_transforms`); None returns the raw sample.
        train: True skips images without any (non-crowd, non-degenerate) box, as training
            does in the release; False keeps every image (evaluation).
        ignore_mode: ``"drop"`` (default, as the release) leaves ``iscrowd`` annotations out;
            ``"exclude"`` returns them as ``target["ignore_boxes"]``.
        check_images: open and verify every image header when validating
            (see :func:`validate_coco`).
        with_masks: also decode each box's ``segmentation`` into ``target["masks"]`` (for
            instance segmentation); an annotation without one gets its filled box.
        data: COCO records already built from ``ann_file`` by another format's reader
            (:func:`o2f.data.formats.read_annotations`); None reads ``ann_file`` as JSON.

    Boxes are clipped to the image (the JSON ``width``/``height``, the displayed size, since
    annotations are drawn on the displayed image); boxes whose width or height is not
    positive afterwards are dropped, with one warning giving their count.

    Attributes:
        coco: the pycocotools ``COCO`` index of the annotation file (for evaluation).
        cat_ids: category ids sorted; label ``i`` is category ``cat_ids[i]``.
        class_names: category names in label order.
        image_ids: the image id of each item.
        aspect_ratios: width / height of each item, from the JSON (for batch grouping).
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        img_dir: str | os.PathLike,
        transforms: Callable | None = None,
        *,
        train: bool,
        ignore_mode: str = "drop",
        check_images: bool = True,
        with_masks: bool = False,
        data: dict | None = None,
    ) -> None:
        if ignore_mode not in ("drop", "exclude"):
            raise ValueError(f"ignore_mode must be 'drop' or 'exclude', got {ignore_mode!r}")
        self.ann_file = Path(ann_file)
        self.img_dir = Path(img_dir)
        self.transforms = transforms
        self.train = train
        self.ignore_mode = ignore_mode
        self.with_masks = with_masks

        data = validate_coco(ann_file, img_dir, check_images=check_images, data=data)
        self.coco = _pycocotools_index(data)

        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self._label_of = {cid: i for i, cid in enumerate(self.cat_ids)}

        self._images: list[dict] = data["images"]
        n_img = len(self._images)
        anns = data["annotations"]
        row = {img["id"]: i for i, img in enumerate(self._images)}
        owner = np.fromiter((row[a["image_id"]] for a in anns), np.int64, len(anns))
        labels = np.fromiter((self._label_of[a["category_id"]] for a in anns), np.int64, len(anns))
        crowd = np.fromiter((bool(a.get("iscrowd", 0)) for a in anns), bool, len(anns))
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)

        # x1y1x2y2 clipped to the (displayed) image, in pixels
        size = np.array([[img["width"], img["height"]] for img in self._images], np.float64)
        wh = size[owner].reshape(-1, 2)
        x1y1 = np.clip(xywh[:, :2], 0, wh)
        x2y2 = np.clip(xywh[:, :2] + xywh[:, 2:], 0, wh)
        valid = (x2y2 > x1y1).all(axis=1)
        if not valid.all():
            bad = np.flatnonzero(~valid)
            files = list(dict.fromkeys(self._images[owner[i]]["file_name"] for i in bad))
            warnings.warn(
                f"{self.ann_file.name}: dropped {len(bad)} of {len(anns)} boxes with a "
                f"non-positive width or height (after clipping to the image), in "
                f"{len(files)} images: {_first(files)}",
                stacklevel=2,
            )
        boxes = np.concatenate([x1y1, x2y2], axis=1).astype(np.float32)

        # Per-image boxes as one flat array plus offsets: no per-image Python objects, so
        # forked DataLoader workers do not copy the annotation table on access.
        plain = valid & ~crowd
        self._boxes, self._labels, self._starts = _group(boxes, labels, owner, plain, n_img)
        self._ignore, _, self._ignore_starts = _group(boxes, labels, owner, valid & crowd, n_img)
        if with_masks:  # the annotation row of each kept box, in _group's order
            rows = np.flatnonzero(plain)
            self._ann_rows = rows[np.argsort(owner[rows], kind="stable")]

        counts = np.diff(self._starts)
        keep = np.flatnonzero(counts > 0) if train else np.arange(n_img)
        self._items = keep
        self.image_ids: list[int] = [self._images[k]["id"] for k in keep]
        self.aspect_ratios: list[float] = [
            self._images[k]["width"] / self._images[k]["height"] for k in keep
        ]

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def label_to_cat_id(self, label: int) -> int:
        """The COCO category id of a contiguous 0-based label."""
        return self.cat_ids[int(label)]

    def cat_id_to_label(self, cat_id: int) -> int:
        """The contiguous 0-based label of a COCO category id."""
        return self._label_of[cat_id]

    def get_image_info(self, index: int) -> dict:
        """The JSON ``images`` record of item ``index`` (id, file_name, width, height, ...)."""
        return self._images[self._items[index]]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        k = int(self._items[index])
        info = self._images[k]
        image = load_image(self.img_dir / info["file_name"])
        h, w = image.shape[-2:]
        boxes = self._boxes[self._starts[k]:self._starts[k + 1]]
        ignore = self._ignore[self._ignore_starts[k]:self._ignore_starts[k + 1]]
        if self.ignore_mode == "drop":
            ignore = ignore[:0]
        target = {
            "boxes": _as_boxes(boxes, (h, w)),
            "labels": torch.tensor(self._labels[self._starts[k]:self._starts[k + 1]]),
            "image_id": int(info["id"]),
            "orig_size": (int(h), int(w)),
            "ignore_boxes": _as_boxes(ignore, (h, w)),
        }
        if self.with_masks:
            rows = self._ann_rows[self._starts[k]:self._starts[k + 1]]
            target["masks"] = self._masks(rows, boxes, (h, w))
        if (h, w) != (info["height"], info["width"]):
            warnings.warn(
                f"{info['file_name']}: decoded size {w}x{h} differs from the annotation's "
                f"{info['width']}x{info['height']}; boxes are clipped to the decoded image",
                stacklevel=2,
            )
            for key in ("boxes", "ignore_boxes"):
                target[key] = F.clamp_bounding_boxes(target[key])
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def _masks(self, rows: np.ndarray, boxes: np.ndarray, size: tuple[int, int]
               ) -> tv_tensors.Mask:
        """(G, h, w) uint8 masks of the annotations ``rows`` (their boxes as fallback),
        cropped or zero-padded to the decoded image size (h, w)."""
        h, w = size
        anns = self.coco.dataset["annotations"]
        out = np.zeros((len(rows), h, w), dtype=np.uint8)
        for i, (row, box) in enumerate(zip(rows, boxes, strict=True)):
            ann = anns[row]
            if ann.get("segmentation"):
                m = self.coco.annToMask(ann)
                mh, mw = min(h, m.shape[0]), min(w, m.shape[1])
                out[i, :mh, :mw] = m[:mh, :mw]
            else:  # no segmentation: the filled (clipped) box
                x1, y1 = (int(np.floor(v)) for v in box[:2])
                x2, y2 = (int(np.ceil(v)) for v in box[2:])
                out[i, y1:y2, x1:x2] = 1
        return tv_tensors.Mask(torch.from_numpy(out))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.ann_file.name}: {len(self)} images, "
            f"{self.num_classes} classes, train={self.train}, ignore_mode={self.ignore_mode!r})"
        )


def _as_boxes(xyxy: np.ndarray, canvas_size: tuple[int, int]) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(
        torch.tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
        format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=canvas_size,
    )


def _group(
    boxes: np.ndarray, labels: np.ndarray, owner: np.ndarray, keep: np.ndarray, n_img: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort the kept rows by image: (boxes M x 4, labels M, starts n_img + 1)."""
    idx = np.flatnonzero(keep)
    idx = idx[np.argsort(owner[idx], kind="stable")]  # keeps the JSON order within an image
    starts = np.zeros(n_img + 1, np.int64)
    np.cumsum(np.bincount(owner[idx], minlength=n_img), out=starts[1:])
    return boxes[idx].reshape(-1, 4), labels[idx], starts


def _pycocotools_index(data: dict) -> Any:
    """A pycocotools ``COCO`` built from already-loaded JSON (no second read, no prints)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
