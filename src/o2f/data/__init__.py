"""Datasets (COCO JSON, CrowdHuman odgt, Pascal VOC, YOLO, box CSV, the built-in digits) and
their transforms."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from torch import Tensor

from o2f.config import Config
from o2f.data.coco import CocoDetection, DatasetError
from o2f.data.formats import FORMATS, detect_format, read_annotations
from o2f.data.transforms import build_transforms, collate

__all__ = ["CocoDetection", "DatasetError", "build_dataset", "collate_eval", "collate_train",
           "split_format"]


def _train_sizes(cfg: Config) -> int | tuple[int, int] | None:
    lo, hi = (list(cfg.data.min_size) * 2)[:2]
    if lo <= 0:
        return None  # native size (the digits demo)
    return int(lo) if lo == hi else (int(lo), int(hi))


def split_format(cfg: Config, split: str) -> str:
    """The annotation format of a split: ``data.<split>.format``, else ``data.format``, else
    told from the path (:func:`o2f.data.formats.detect_format`)."""
    part = getattr(cfg.data, split)
    fmt = part.format or cfg.data.format or detect_format(part.ann_file)
    if fmt not in FORMATS:
        raise DatasetError(f"data.{split}.format must be one of {', '.join(FORMATS)}, "
                           f"got '{fmt}'")
    return fmt


def coco_annotation_file(cfg: Config, split: str) -> Path:
    """The COCO JSON of a coco or odgt split; CrowdHuman ``.odgt`` files are converted once
    (cached)."""
    part = getattr(cfg.data, split)
    ann = Path(part.ann_file)
    fmt = split_format(cfg, split)
    if fmt == "coco":
        return ann
    if fmt != "odgt":
        raise DatasetError(f"data.{split}: {fmt} annotations have no COCO file; "
                           f"use build_dataset (or o2f data convert)")
    from o2f.data.crowdhuman import odgt_to_coco

    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found")
    stat = ann.stat()
    key = hashlib.sha1(f"{ann.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = Path(tempfile.gettempdir()) / f"o2f-odgt-{key.hexdigest()[:16]}.json"
    if not out.exists():
        try:
            odgt_to_coco(ann, part.img_dir, out)
        except DatasetError:
            raise
        except UnicodeDecodeError as e:
            raise DatasetError(f"{ann}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except ValueError as e:  # the message names the file and line
            raise DatasetError(str(e)) from None
    return out


def build_dataset(cfg: Config, split: str) -> CocoDetection:
    """The ``train`` split with the recipe's augmentation, or ``val`` for evaluation (no
    resize: the model resizes inside). For ``model.task="instance"`` the train split also
    decodes each box's mask (``target["masks"]``); evaluation reads the ground-truth masks
    from the annotation file itself, so ``val`` does not.

    Any format of :data:`o2f.data.formats.FORMATS` is read into the same records, so the
    dataset is the same whichever format the files are in."""
    part = getattr(cfg.data, split)
    if not part.ann_file:
        raise DatasetError(f"data.{split}.ann_file is not set")
    train = split == "train"
    transforms = (build_transforms(True, min_size=_train_sizes(cfg), max_size=cfg.data.max_size,
                                   flip=cfg.data.flip)
                  if train else build_transforms(False, min_size=None))
    fmt = split_format(cfg, split)
    options = {"train": train, "ignore_mode": cfg.model.ignore_mode,
               "check_images": cfg.data.check_images,
               "with_masks": train and cfg.model.task == "instance"}
    if fmt == "coco":
        dataset = CocoDetection(part.ann_file, part.img_dir, transforms, **options)
    elif fmt == "odgt":  # the cached conversion, with messages naming the .odgt file
        records = json.loads(coco_annotation_file(cfg, split).read_text(encoding="utf-8"))
        dataset = CocoDetection(part.ann_file, part.img_dir, transforms, data=records,
                                **options)
    else:
        records, img_dir, _ = read_annotations(part.ann_file, part.img_dir or None, fmt, split)
        dataset = CocoDetection(part.ann_file, img_dir, transforms, data=records, **options)
    dataset.source_file = Path(part.ann_file)
    dataset.format = fmt
    return dataset


def collate_train(batch: list[tuple[Tensor, dict[str, Any]]]):
    """(images B x 3 x H x W normalised and padded, sizes [(h, w)], targets)."""
    return collate(batch, size_divisible=32)


def collate_eval(batch: list[tuple[Tensor, dict[str, Any]]]):
    """(list of 3 x H x W images in [0, 1], targets): the model resizes and pads itself."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
