"""CrowdHuman ``.odgt`` files: read, write, and convert to COCO JSON.

An ``.odgt`` file holds one JSON object per line, one line per image::

    {"ID": "273271,1a0d6000b9e1f5b7", "gtboxes": [
        {"tag": "person", "fbox": [x, y, w, h], "vbox": [...], "hbox": [...],
         "extra": {"ignore": 0, ...}}, ...]}

Boxes are ``[x, y, w, h]`` in pixels. ``tag == "mask"`` marks a crowd / reflection region and
``extra.ignore == 1`` a person too ambiguous to count: both are ignore regions. The official
files carry no image size; the images are ``{ID}.jpg`` in one folder. Detection files use the
same layout with ``"dtboxes": [{"box": [x, y, w, h], "score": s, "tag": 1}]``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_images",
    "image_size",
    "is_ignore",
    "iter_odgt",
    "load_odgt",
    "odgt_to_coco",
    "write_odgt",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def iter_odgt(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)`` for each non-blank line of an ``.odgt`` file
    (1-based line numbers, so later errors can point at the record).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: ``"{path}:{line}: ..."`` for a line that is not a JSON object with an
            ``ID``.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                ) from None
            if not isinstance(rec, dict) or "ID" not in rec:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with an 'ID' key")
            yield lineno, rec


def load_odgt(path: str | os.PathLike) -> list[dict]:
    """Read an ``.odgt`` file: one dict per non-blank line, in file order.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming the file and line of a malformed record.
    """
    return [rec for _, rec in iter_odgt(path)]


def write_odgt(records: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write records as an ``.odgt`` file (one compact JSON object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def is_ignore(gtbox: Mapping[str, Any]) -> bool:
    """True for an ignore region: any tag other than ``"person"`` (CrowdHuman uses
    ``"mask"``), or a non-zero ``extra.ignore``."""
    extra = gtbox.get("extra") or {}
    if not isinstance(extra, Mapping):
        extra = {}
    return gtbox.get("tag") != "person" or extra.get("ignore", 0) != 0


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as displayed (EXIF orientation applied), from its header
    only: the pixels are not decoded."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
            w, h = h, w
    return h, w


def find_images(image_dir: str | os.PathLike) -> dict[str, str]:
    """stem -> file name of the images in ``image_dir``, from one directory listing (when a
    stem has several files, the earliest extension of ``IMAGE_EXTENSIONS`` wins)."""
    found: dict[str, str] = {}
    for name in os.listdir(image_dir):
        stem, ext = os.path.splitext(name)
        rank = IMAGE_EXTENSIONS.index(ext.lower()) if ext.lower() in IMAGE_EXTENSIONS else None
        if rank is None:
            continue
        old = found.get(stem)
        if old is None or rank < IMAGE_EXTENSIONS.index(os.path.splitext(old)[1].lower()):
            found[stem] = name
    return found


def odgt_to_coco(
    odgt_path: str | os.PathLike,
    image_dir: str | os.PathLike | None,
    out_json: str | os.PathLike | None,
    *,
    sizes: Mapping[str, tuple[int, int]] | None = None,
) -> dict:
    """Convert CrowdHuman ground truth to a COCO instances JSON.

    Full-body boxes (``fbox``, ``[x, y, w, h]``, not clipped) become annotations of category
    1 ``"person"``; ignore regions (see :func:`is_ignore`) become ``iscrowd=1`` annotations.
    Images get ids 1..N in file order and ``file_name`` ``{ID}.jpg`` (or the ``.png`` /
    ``.jpeg`` found in ``image_dir``), so ``Path(file_name).stem`` is the odgt ``ID``.

    Image sizes come from the record's ``width``/``height``, else ``sizes[ID]`` =
    ``(height, width)``, else the image header in ``image_dir``.

    Returns:
        The COCO dict (also written to ``out_json`` unless it is None).

    Raises:
        ValueError: naming the file and line of a malformed record or of an image whose size
            cannot be found.
    """
    have_dir = image_dir is not None and Path(image_dir).is_dir()
    files = find_images(image_dir) if have_dir else {}
    images, annotations = [], []
    seen: dict[str, int] = {}
    for image_id, (lineno, rec) in enumerate(iter_odgt(odgt_path), start=1):
        key = str(rec["ID"])
        if key in seen:
            raise ValueError(f"{odgt_path}:{lineno}: image ID {key!r} repeats line {seen[key]}")
        seen[key] = lineno
        file_name = files.get(key, f"{key}.jpg")
        if "width" in rec and "height" in rec:
            h, w = rec["height"], rec["width"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) and v > 0 for v in (h, w)):
                raise ValueError(f"{odgt_path}:{lineno}: width/height of {key!r} are not "
                                 f"positive numbers")
        elif sizes is not None and key in sizes:
            h, w = sizes[key]
        elif key in files:
            h, w = image_size(Path(image_dir) / file_name)
        else:
            raise ValueError(
                f"{odgt_path}:{lineno}: no size for image {key!r}: the record has no "
                f"width/height, it is not in `sizes`, and no image file for it was found in "
                f"{image_dir}"
            )
        images.append({"id": image_id, "file_name": file_name,
                       "width": int(w), "height": int(h)})
        gtboxes = rec.get("gtboxes") or []
        if not isinstance(gtboxes, list):
            raise ValueError(f"{odgt_path}:{lineno}: 'gtboxes' of {key!r} is not a list")
        for box in gtboxes:
            if not isinstance(box, dict) or "fbox" not in box:
                raise ValueError(f"{odgt_path}:{lineno}: a gtbox of {key!r} has no 'fbox'")
            fbox = box["fbox"]
            if not (isinstance(fbox, list) and len(fbox) == 4 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) for v in fbox)):
                raise ValueError(f"{odgt_path}:{lineno}: an fbox of {key!r} is not 4 finite "
                                 f"numbers [x, y, w, h]: {fbox!r}"[:300])
            x, y, bw, bh = (float(v) for v in fbox)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": int(is_ignore(box)),
            })
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "person"}]}
    if out_json is None:
        return coco
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(coco), encoding="utf-8")
    os.replace(tmp, out)  # a reader never sees a half-written file
    return coco
