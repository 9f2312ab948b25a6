"""What the annotation readers share: the COCO records they all build, class lists, image
listing and image sizes.

Every reader returns a COCO dict (``images``, ``annotations``, ``categories``) whose
``file_name`` are relative to the image folder it returns with it, so
:class:`o2f.data.coco.CocoDetection`, the transforms and the evaluation never know which
format the data came from. Category ids are 1..K in class order (label ``i`` is class
``names[i]``); image ids 1..N in the reader's order; each annotation also carries
``source`` (``"file:line"``) so later checks can point at the line it came from.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from o2f.data.coco import DatasetError
from o2f.data.crowdhuman import image_size

__all__ = ["IMAGE_SUFFIXES", "CocoRecords", "annotation", "categories", "find_class_file",
           "list_images", "number", "read_class_file", "read_image_size", "read_text"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
CLASS_FILES = ("classes.txt", "obj.names", "labels.txt")

CocoRecords = dict[str, list[dict[str, Any]]]


def read_text(path: Path) -> str:
    """The UTF-8 text of an annotation file (a BOM is dropped); a one-line error naming the
    file otherwise."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise DatasetError(f"{path}: is a folder, expected an annotation file") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None


def number(text: Any, where: str, what: str) -> float:
    """``text`` as a finite float, else a DatasetError ``"{where}: {what} ..."``."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: {what} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where}: {what} is not finite: {text!r}")
    return value


def read_class_file(path: Path) -> list[str]:
    """Class names, one per non-blank line, in order; duplicates are an error."""
    names = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DatasetError(f"{path}:{lineno}: class {name!r} listed twice")
        names.append(name)
    if not names:
        raise DatasetError(f"{path}: no class names in the file")
    return names


def find_class_file(*folders: Path) -> Path | None:
    """The first ``classes.txt`` / ``obj.names`` / ``labels.txt`` in ``folders``."""
    for folder in folders:
        for name in CLASS_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def categories(names: list[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": n} for i, n in enumerate(names)]


def annotation(ann_id: int, image_id: int, label: int, x1: float, y1: float, x2: float,
               y2: float, source: str, iscrowd: int = 0) -> dict[str, Any]:
    """A COCO annotation from an x1y1x2y2 box in pixels (``label`` 0-based)."""
    w, h = x2 - x1, y2 - y1
    return {"id": ann_id, "image_id": image_id, "category_id": label + 1,
            "bbox": [x1, y1, w, h], "area": max(w, 0.0) * max(h, 0.0), "iscrowd": iscrowd,
            "source": source}


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted by their relative path."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    found = [Path(root) / f for root, _, files in os.walk(folder, followlinks=True)
             for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_image_size(path: Path, where: str) -> tuple[int, int]:
    """(height, width) as displayed, from the header; a one-line error naming ``where``."""
    try:
        return image_size(path)
    except FileNotFoundError:
        raise DatasetError(f"{where}: image {path} not found") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        raise DatasetError(f"{where}: cannot read image {path} ({type(e).__name__})") from None
