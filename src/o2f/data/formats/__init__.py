"""Annotation formats: COCO JSON, CrowdHuman odgt, Pascal VOC XML, YOLO txt and box CSV.

Each reader turns its files into the COCO records :class:`o2f.data.coco.CocoDetection`
reads (see :mod:`o2f.data.formats.common`), so everything after loading is the same
whatever the format. :func:`read_annotations` picks the reader, :func:`detect_format` tells
the format from a path, :func:`convert` writes the records in another format.

Why no converter library: globox, supervision and pybboxes were measured (docs/formats.md).
None keeps both the class order and the boxes exactly through a round trip (globox sorts
classes by name and drops unused ones; supervision rounds VOC boxes to integers after a
1-based shift and decodes images with OpenCV; pybboxes converts single boxes only and pins
an old numpy), and none reports the file and line of a bad record.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from o2f.data.coco import DatasetError
from o2f.data.formats.common import CocoRecords

__all__ = ["FORMATS", "WRITABLE", "convert", "default_image_dir", "detect_format",
           "read_annotations", "write_annotations"]

FORMATS = ("coco", "odgt", "voc", "yolo", "csv")
WRITABLE = ("coco", "yolo", "voc", "csv")


def detect_format(ann_file: str | os.PathLike) -> str:
    """The format of an annotation path, from its suffix or, for a folder, its contents:
    ``.json`` coco, ``.odgt`` odgt, ``.csv`` csv, ``.yaml`` yolo, a folder of ``.xml`` (or
    with ``Annotations/``) or an ``ImageSets`` split file voc, a folder of ``.txt`` yolo.

    Raises:
        DatasetError: when the path does not exist or its format cannot be told.
    """
    path = Path(ann_file)
    by_suffix = {".json": "coco", ".odgt": "odgt", ".csv": "csv", ".yaml": "yolo",
                 ".yml": "yolo"}
    if path.suffix.lower() in by_suffix:
        return by_suffix[path.suffix.lower()]
    if path.is_file() and path.suffix == ".txt" and "ImageSets" in path.parts:
        return "voc"
    if path.is_dir():
        if (path / "Annotations").is_dir():
            raise DatasetError(f"{path}: a VOC root; give its Annotations folder or an "
                               f"ImageSets/Main/<split>.txt file")
        if (path / "data.yaml").is_file():
            raise DatasetError(f"{path}: a YOLO dataset; give its data.yaml")
        for child in path.rglob("*"):
            if child.suffix == ".xml":
                return "voc"
            if child.suffix == ".txt" and child.name not in ("classes.txt", "labels.txt"):
                return "yolo"
    if not path.exists():
        raise DatasetError(f"{path}: annotation file or folder not found")
    raise DatasetError(f"{path}: cannot tell the annotation format; set it "
                       f"(data.train.format / --from: {', '.join(FORMATS)})")


def default_image_dir(ann_file: Path) -> Path:
    """Where the images of a COCO / odgt file probably are, when not given: ``../<stem>``
    (``annotations/train.json`` -> ``train/``), ``../images/<stem>`` (what ``o2f data
    convert`` writes), ``images/`` beside it or above it, else its folder."""
    up = ann_file.parent.parent
    for guess in (up / ann_file.stem, up / "images" / ann_file.stem, ann_file.parent / "images",
                  up / "images", up / "Images"):
        if guess.is_dir():
            return guess
    return ann_file.parent


def read_annotations(ann_file: str | os.PathLike, img_dir: str | os.PathLike | None = None,
                     fmt: str | None = None, split: str = "train"
                     ) -> tuple[CocoRecords, Path, str]:
    """``(records, image folder, format)`` of any supported annotation file or folder.

    ``fmt`` None detects it (:func:`detect_format`); ``split`` chooses the split of a YOLO
    ``data.yaml``. COCO files are checked as :func:`o2f.data.coco.validate_coco` does.

    Raises:
        DatasetError: a one-line message naming the file (and line) of the problem.
    """
    ann_file = Path(ann_file)
    fmt = fmt or detect_format(ann_file)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown annotation format '{fmt}'; choose from "
                           f"{', '.join(FORMATS)}")
    if fmt == "voc":
        from o2f.data.formats.voc import read_voc

        records, root = read_voc(ann_file, img_dir)
    elif fmt == "yolo":
        from o2f.data.formats.yolo import read_yolo

        records, root = read_yolo(ann_file, img_dir, split)
    elif fmt == "csv":
        from o2f.data.formats.boxcsv import read_csv

        records, root = read_csv(ann_file, img_dir)
    elif fmt == "odgt":
        from o2f.data.crowdhuman import odgt_to_coco

        root = Path(img_dir) if img_dir else default_image_dir(ann_file)
        try:
            records = odgt_to_coco(ann_file, root, None)
        except FileNotFoundError:
            raise DatasetError(f"{ann_file}: annotation file not found") from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{ann_file}: not UTF-8 text ({e.reason})") from None
        except DatasetError:
            raise
        except ValueError as e:  # messages already name the file and line
            raise DatasetError(str(e)) from None
    else:
        from o2f.data.coco import _check_ids, _check_structure, _load_json

        if not ann_file.is_file():
            raise DatasetError(f"{ann_file}: annotation file not found")
        root = Path(img_dir) if img_dir else default_image_dir(ann_file)
        records = _load_json(ann_file)
        _check_structure(records, ann_file)
        _check_ids(records, ann_file)
    return records, root, fmt


def _place_images(records: CocoRecords, src: Path, dst: Path, mode: str) -> None:
    """Link (or copy) every image of ``records`` from ``src`` to ``dst`` (same relative
    names). ``mode``: link (a symbolic link, a copy where links are not allowed), copy,
    none."""
    if mode == "none":
        return
    for img in records["images"]:
        source, target = src / img["file_name"], dst / img["file_name"]
        if not source.is_file():
            raise DatasetError(f"{source}: image not found")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if mode == "link":
            try:
                target.symlink_to(source.resolve())
                continue
            except OSError:
                pass
        shutil.copy2(source, target)


def write_annotations(records: CocoRecords, fmt: str, out_dir: str | os.PathLike, split: str
                      ) -> tuple[Path, Path]:
    """Write ``records`` in ``fmt`` under ``out_dir``; returns (annotation path, the folder
    the images belong in)::

        coco  out_dir/annotations/<split>.json                images/<split>/
        yolo  out_dir/data.yaml, labels/<split>/*.txt         images/<split>/
        voc   out_dir/Annotations/*.xml, ImageSets/Main/<split>.txt, classes.txt  JPEGImages/
        csv   out_dir/<split>.csv, classes.txt                images/<split>/
    """
    import json

    out_dir = Path(out_dir)
    clean = {**records, "annotations": [{k: v for k, v in a.items() if k != "source"}
                                        for a in records["annotations"]]}
    if fmt == "coco":
        path = out_dir / "annotations" / f"{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean), encoding="utf-8")
        return path, out_dir / "images" / split
    if fmt == "yolo":
        from o2f.data.formats.yolo import write_yolo

        return write_yolo(clean, out_dir, split), out_dir / "images" / split
    if fmt == "voc":
        from o2f.data.formats.voc import write_voc

        return write_voc(clean, out_dir, split), out_dir / "JPEGImages"
    if fmt == "csv":
        from o2f.data.formats.boxcsv import write_csv

        # image paths in a CSV are relative to the CSV
        moved = {**clean, "images": [{**img, "file_name": f"images/{split}/{img['file_name']}"}
                                     for img in clean["images"]]}
        return write_csv(moved, out_dir / f"{split}.csv"), out_dir / "images" / split
    raise DatasetError(f"cannot write '{fmt}'; choose from {', '.join(WRITABLE)}")


def convert(src: str | os.PathLike, to: str, out_dir: str | os.PathLike, *,
            src_format: str | None = None, img_dir: str | os.PathLike | None = None,
            split: str | None = None, images: str = "link") -> dict[str, object]:
    """Read ``src`` (any of :data:`FORMATS`), write it as ``to`` under ``out_dir`` and place
    the images where that layout expects them (``images``: link, copy or none).

    ``split`` names the output (``<split>.json``, ``labels/<split>/``...) and selects the split
    of a YOLO data.yaml; default: ``train`` for a data.yaml, else the source's file name stem.

    Returns:
        ``{"annotations": path, "images": folder, "format": source format, "num_images",
        "num_boxes", "classes"}``.
    """
    src = Path(src)
    if to not in WRITABLE:
        raise DatasetError(f"cannot write '{to}'; choose from {', '.join(WRITABLE)}")
    if images not in ("link", "copy", "none"):
        raise ValueError(f"images must be link, copy or none, got {images!r}")
    if split is None:
        yolo_yaml = src.suffix in (".yaml", ".yml")
        split = "train" if yolo_yaml else (src.stem if src.is_file() else src.name)
    records, root, fmt = read_annotations(src, img_dir, src_format, split)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        path, image_dst = write_annotations(records, to, out_dir, split)
    _place_images(records, root, image_dst, images)
    return {"annotations": path, "images": image_dst if images != "none" else root,
            "format": fmt, "num_images": len(records["images"]),
            "num_boxes": len(records["annotations"]),
            "classes": [c.get("name", c["id"]) for c in sorted(records["categories"],
                                                                key=lambda c: c["id"])]}
