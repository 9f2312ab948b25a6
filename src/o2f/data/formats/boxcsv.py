"""Box CSV: ``image_path,xmin,ymin,xmax,ymax,label``, one object per row (the layout of
DeepForest, keras-retinanet and many aerial-imagery tools), read into COCO records.

- Coordinates are pixels, x1y1x2y2 (no 1-based shift).
- A header row is optional; when present the columns are found by name (``image_path`` /
  ``image`` / ``filename``, ``xmin``/``x1``, ..., ``label`` / ``class``) and others are
  ignored; without one the six columns are positional.
- A row whose coordinates and label are all empty (``img.jpg,,,,,``) lists an image with no
  objects.
- Image paths are relative to the CSV's folder (or to ``img_dir`` when given); images are
  numbered in order of first appearance.
- Class order: ``classes.txt`` beside the CSV when present, else the names sorted.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from o2f.data.coco import DatasetError
from o2f.data.formats.common import (
    CocoRecords,
    annotation,
    categories,
    find_class_file,
    number,
    read_class_file,
    read_image_size,
    read_text,
)

__all__ = ["read_csv", "write_csv"]

COLUMNS = ("image_path", "xmin", "ymin", "xmax", "ymax", "label")
_ALIASES = {
    "image_path": ("image_path", "image", "filename", "file_name", "path", "img"),
    "xmin": ("xmin", "x1", "x_min"), "ymin": ("ymin", "y1", "y_min"),
    "xmax": ("xmax", "x2", "x_max"), "ymax": ("ymax", "y2", "y_max"),
    "label": ("label", "class", "class_name", "category", "name"),
}


def _columns(header: list[str], path: Path) -> list[int] | None:
    """Column index of each of COLUMNS if ``header`` is a header row, else None."""
    lowered = [h.strip().lower() for h in header]
    if not any(h in lowered for h in ("xmin", "x1", "image_path", "label", "class")):
        return None
    index = []
    for col in COLUMNS:
        found = [lowered.index(a) for a in _ALIASES[col] if a in lowered]
        if not found:
            raise DatasetError(f"{path}:1: header has no '{col}' column (columns: "
                               f"{', '.join(header)})")
        index.append(found[0])
    return index


def read_csv(ann_file: str | os.PathLike, img_dir: str | os.PathLike | None = None
             ) -> tuple[CocoRecords, Path]:
    """COCO records of a box CSV (see the module docstring) and the folder their
    ``file_name`` are relative to.

    Raises:
        DatasetError: naming the file and line of a row with the wrong number of columns, a
            coordinate that is not a finite number, a class not in ``classes.txt``, or an
            image that is missing or unreadable.
    """
    ann_file = Path(ann_file)
    root = Path(img_dir) if img_dir else ann_file.parent
    text = read_text(ann_file)
    class_file = find_class_file(ann_file.parent)
    names = read_class_file(class_file) if class_file else None
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as e:
        raise DatasetError(f"{ann_file}: not a CSV file ({e})") from None
    if not rows:
        raise DatasetError(f"{ann_file}: empty CSV file")
    cols = _columns(rows[0], ann_file)
    start = 1 if cols is not None else 0
    cols = cols or list(range(6))
    need = max(cols) + 1

    images: dict[str, dict[str, Any]] = {}
    objects: list[tuple[int, str, list[float], str]] = []
    for lineno, row in enumerate(rows[start:], start=start + 1):
        if not row or all(not v.strip() for v in row):
            continue
        where = f"{ann_file}:{lineno}"
        if len(row) < need:
            raise DatasetError(f"{where}: expected {need} columns "
                               f"(image_path,xmin,ymin,xmax,ymax,label), got {len(row)}")
        path, *box, label = (row[c].strip() for c in cols)
        if not path:
            raise DatasetError(f"{where}: empty image path")
        if path not in images:
            height, width = read_image_size(root / path, where)
            images[path] = {"id": len(images) + 1, "file_name": path, "width": width,
                            "height": height}
        if not label and not any(box):
            continue  # an image listed without objects
        if not label:
            raise DatasetError(f"{where}: empty label")
        coords = [number(v, where, c) for v, c in zip(box, COLUMNS[1:5], strict=True)]
        objects.append((images[path]["id"], label, coords, where))

    if names is None:
        names = sorted({o[1] for o in objects})
    label_of = {n: i for i, n in enumerate(names)}
    annotations = []
    for image_id, name, (x1, y1, x2, y2), where in objects:
        if name not in label_of:
            raise DatasetError(f"{where}: class {name!r} is not in {class_file}")
        annotations.append(annotation(len(annotations) + 1, image_id, label_of[name],
                                      x1, y1, x2, y2, where))
    return {"images": list(images.values()), "annotations": annotations,
            "categories": categories(names)}, root


def write_csv(coco: CocoRecords, path: str | os.PathLike) -> Path:
    """Write COCO records as a box CSV with a header (images without objects get an empty
    row) and ``classes.txt`` beside it (the class order). ``iscrowd`` boxes are written like
    the others: CSV has no ignore flag."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name_of = {c["id"]: str(c.get("name", c["id"])) for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for img in coco["images"]:
            if not by_image[img["id"]]:
                w.writerow([img["file_name"], "", "", "", "", ""])
            for ann in by_image[img["id"]]:
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                w.writerow([img["file_name"], *(_fmt(v) for v in (x, y, x + bw, y + bh)),
                            name_of[ann["category_id"]]])
    names = [name_of[c["id"]] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    (path.parent / "classes.txt").write_text("".join(f"{n}\n" for n in names),
                                             encoding="utf-8")
    return path


def _fmt(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".")
