"""YOLO txt labels (Ultralytics / Darknet layout), read into (and written from) COCO records.

One ``.txt`` per image, one object per line: ``class cx cy w h``, the class a 0-based index
and the box normalised by the image's width and height (a line with more values,
``class x1 y1 x2 y2 x3 y3 ...``, is a segment: its bounding box is used). An image without
a label file, or with an empty one, has no objects.

``ann_file`` is either

- a ``data.yaml`` (``path``, ``train`` / ``val`` / ``test``: a folder of images, a ``.txt``
  list of image paths, or a list of those; ``names``: a list or ``{index: name}``); the
  split read is the config's (``data.train`` reads ``train``); labels are found as
  Ultralytics does, replacing the last ``images`` folder of an image's path by ``labels``;
- or a folder of label files, with the images in ``img_dir`` (default: the sibling folder
  with ``labels`` replaced by ``images``) and the class names in ``classes.txt`` /
  ``obj.names`` in the label folder or its parent.

Image sizes come from the image headers (EXIF orientation applied).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from o2f.data.coco import DatasetError
from o2f.data.formats.common import (
    IMAGE_SUFFIXES,
    CocoRecords,
    annotation,
    categories,
    find_class_file,
    list_images,
    number,
    read_class_file,
    read_image_size,
    read_text,
)

__all__ = ["read_yolo", "write_yolo"]


def _names(raw: Any, where: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: 'names' keys must be class indices 0..N-1") from None
        if keys != list(range(len(keys))):
            raise DatasetError(f"{where}: 'names' keys must be 0..{len(keys) - 1}, got {keys}")
        by_index = {int(k): v for k, v in raw.items()}
        return [str(by_index[i]) for i in keys]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"{where}: 'names' must be a list or a mapping of class names")


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    else:
        raise DatasetError(f"{image}: no 'images' folder in the path, so no labels folder "
                           f"beside it (YOLO keeps images/ and labels/ side by side)")
    return Path(*parts).with_suffix(".txt")


def _split_images(entry: Any, root: Path, where: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    images: list[Path] = []
    for item in entries:
        if not isinstance(item, str):
            raise DatasetError(f"{where}: a split must be a path or a list of paths, got "
                               f"{item!r}")
        p = root / item
        if p.is_dir():
            images += list_images(p)
        elif p.suffix == ".txt" and p.is_file():
            for line in read_text(p).splitlines():
                line = line.strip()
                if line:
                    images.append((p.parent / line) if line.startswith("./") else root / line)
        else:
            raise DatasetError(f"{where}: split path {p} is neither a folder nor a .txt list")
    return images


def _from_yaml(ann_file: Path, split: str) -> tuple[list[Path], list[Path], list[str], Path]:
    try:
        data = yaml.safe_load(read_text(ann_file))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise DatasetError(f"{ann_file}{line}: not valid YAML") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: expected a mapping with 'names' and the splits")
    if "names" not in data:
        raise DatasetError(f"{ann_file}: no 'names' (the class names)")
    names = _names(data["names"], ann_file)
    root = ann_file.parent / str(data.get("path") or ".")
    if split not in data or data[split] in (None, ""):
        raise DatasetError(f"{ann_file}: no '{split}' split")
    images = _split_images(data[split], root, ann_file)
    return images, [_label_path(p) for p in images], names, root


def _from_folder(labels: Path, img_dir: Path | None) -> tuple[list[Path], list[Path],
                                                              list[str], Path]:
    if img_dir is None:
        img_dir = _label_path_inverse(labels)
    class_file = find_class_file(labels, labels.parent)
    if class_file is None:
        raise DatasetError(f"{labels}: no classes.txt or obj.names beside the labels (one class "
                           f"name per line, in index order)")
    images = list_images(img_dir)
    label_files = [labels / p.relative_to(img_dir).with_suffix(".txt") for p in images]
    stray = {p for p in labels.rglob("*.txt") if p.name not in ("classes.txt",)} \
        - set(label_files)
    if stray:
        warnings.warn(f"{labels}: {len(stray)} label files have no image in {img_dir}: "
                      f"{', '.join(sorted(p.name for p in stray)[:5])}", stacklevel=3)
    return images, label_files, read_class_file(class_file), img_dir


def _label_path_inverse(labels: Path) -> Path:
    parts = list(labels.parts)
    if "labels" not in parts:
        raise DatasetError(f"{labels}: set the image folder (data.*.img_dir / --img-dir); it "
                           f"cannot be guessed from a path without a 'labels' folder")
    i = len(parts) - 1 - parts[::-1].index("labels")
    parts[i] = "images"
    return Path(*parts)


def _read_label_file(path: Path, num_classes: int, width: float, height: float
                     ) -> list[tuple[int, float, float, float, float, str]]:
    """(label, x1, y1, x2, y2, "file:line") per object line, in pixels."""
    if not path.is_file():
        return []
    out = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        values = line.split()
        if not values:
            continue
        where = f"{path}:{lineno}"
        if len(values) != 5 and (len(values) < 7 or len(values) % 2 == 0):
            raise DatasetError(f"{where}: expected 'class cx cy w h' (5 values) or a segment "
                               f"'class x1 y1 x2 y2 x3 y3 ...', got {len(values)} values")
        cls = number(values[0], where, "class")
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DatasetError(f"{where}: class {values[0]!r} is not an index in "
                               f"0..{num_classes - 1}")
        coords = [number(v, where, "coordinate") for v in values[1:]]
        if len(coords) == 4:
            cx, cy, w, h = coords
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        else:
            xs, ys = coords[0::2], coords[1::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        out.append((int(cls), x1 * width, y1 * height, x2 * width, y2 * height, where))
    return out


def read_yolo(ann_file: str | os.PathLike, img_dir: str | os.PathLike | None = None,
              split: str = "train") -> tuple[CocoRecords, Path]:
    """COCO records of YOLO labels (see the module docstring) and the folder their
    ``file_name`` are relative to.

    Raises:
        DatasetError: naming the file (and line) of a malformed line, a class index out of
            range, a value that is not a finite number, or an unreadable image.
    """
    ann_file = Path(ann_file)
    if ann_file.suffix in (".yaml", ".yml"):
        images, label_files, names, root = _from_yaml(ann_file, split)
    elif ann_file.is_dir():
        images, label_files, names, root = _from_folder(ann_file, Path(img_dir) if img_dir
                                                        else None)
    else:
        raise DatasetError(f"{ann_file}: expected a data.yaml or a folder of label files")
    records: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (image, label_file) in enumerate(zip(images, label_files, strict=True),
                                                   start=1):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(f"{image}: not an image file")
        height, width = read_image_size(image, str(label_file))
        file_name = os.path.relpath(image, root) if image.is_relative_to(root) else str(image)
        records.append({"id": image_id, "file_name": Path(file_name).as_posix(),
                        "width": width, "height": height})
        for label, x1, y1, x2, y2, where in _read_label_file(label_file, len(names),
                                                             width, height):
            annotations.append(annotation(len(annotations) + 1, image_id, label,
                                          x1, y1, x2, y2, where))
    return {"images": records, "annotations": annotations,
            "categories": categories(names)}, root


def write_yolo(coco: CocoRecords, out_dir: str | os.PathLike, split: str) -> Path:
    """Write COCO records as ``out_dir/labels/<split>/<stem>.txt`` (ten significant
    digits: integer pixel boxes read back as the same float32 numbers) and add the split
    to ``out_dir/data.yaml`` (created or updated; ``names`` in label order). The images
    belong in ``out_dir/images/<split>/``. YOLO has no ignore flag: ``iscrowd`` boxes are
    left out, with a warning. Returns the data.yaml path."""
    out_dir = Path(out_dir)
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i for i, c in enumerate(cats)}
    size = {img["id"]: (float(img["width"]), float(img["height"])) for img in coco["images"]}
    lines: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
    crowd = 0
    for ann in coco["annotations"]:
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        W, H = size[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        values = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
        lines[ann["image_id"]].append(" ".join([str(label_of[ann["category_id"]]),
                                                *(f"{v:.10g}" for v in values)]))
    if crowd:
        warnings.warn(f"YOLO has no ignore regions: {crowd} iscrowd boxes left out",
                      stacklevel=2)
    for img in coco["images"]:
        # where readers look for the labels of images/<split>/<file_name>
        path = _label_path(out_dir / "images" / split / img["file_name"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines[img["id"]]), encoding="utf-8")
    data_yaml = out_dir / "data.yaml"
    data = yaml.safe_load(data_yaml.read_text()) if data_yaml.is_file() else {}
    data = data if isinstance(data, dict) else {}
    # no 'path': readers (ours and Ultralytics') then take the yaml's own folder
    data.update({split: f"images/{split}",
                 "names": {i: str(c.get("name", c["id"])) for i, c in enumerate(cats)}})
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return data_yaml
