"""Pascal VOC XML: one ``.xml`` per image, read into (and written from) COCO records.

Layouts read::

    ROOT/Annotations/*.xml   ROOT/JPEGImages/*   [ROOT/ImageSets/Main/<split>.txt]

``ann_file`` is the ``Annotations`` folder (every ``.xml`` under it, sorted by path) or a
split file of ``ImageSets`` (one image id per line: ``Annotations/<id>.xml``). Images are
looked up as ``img_dir/<filename>`` (``img_dir`` defaults to ``ROOT/JPEGImages``); the
image size comes from ``<size>``, or from the image header when it is missing or zero.

Coordinates are VOC's 1-based inclusive pixel indices: ``xmin=1, xmax=W`` spans the whole
image, which is ``x1=0, x2=W`` in the project's pixels (``x1 = xmin - 1``, ``x2 = xmax``, as
Detectron2 reads them). ``<difficult>1</difficult>`` objects become ``iscrowd`` (ignore)
regions, which training leaves out and evaluation ignores, as in the VOC protocol.

Class order: ``classes.txt`` (one name per line) in the annotation folder or its parent
when present (the writer puts one there), else the names found, sorted (for VOC's own 20
classes that is the usual order).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from xml.parsers import expat

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

__all__ = ["read_voc", "write_voc"]


def _parse(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """The XML tree of ``path`` and the line where each element starts."""
    parser = expat.ParserCreate()
    builder = ET.TreeBuilder()
    lines: dict[ET.Element, int] = {}

    def start(tag: str, attrs: dict[str, str]) -> None:
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except FileNotFoundError:
        raise DatasetError(f"{path}: annotation file not found") from None
    except expat.ExpatError as e:
        raise DatasetError(f"{path}:{e.lineno}: malformed XML ({expat.errors.messages[e.code]}"
                           f" at column {e.offset})") from None
    return builder.close(), lines


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{where}: <{node.tag}> has no <{tag}>")
    return child.text.strip()


def _xml_files(ann_file: Path) -> tuple[list[Path], Path]:
    """The XML files named by ``ann_file`` and the VOC root (the Annotations' parent)."""
    if ann_file.is_dir():
        files = sorted(ann_file.rglob("*.xml"), key=lambda p: p.relative_to(ann_file).as_posix())
        if not files:
            raise DatasetError(f"{ann_file}: no .xml files in the folder")
        return files, ann_file.parent
    # a split file of ImageSets/Main: ROOT/ImageSets/Main/<split>.txt
    root = ann_file.parent.parent.parent if ann_file.parent.parent.name == "ImageSets" \
        else ann_file.parent
    text = read_text(ann_file)
    files = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]  # per-class split files add a 1 / -1 column
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DatasetError(f"{ann_file}:{lineno}: {xml} not found")
        files.append(xml)
    return files, root


def read_voc(ann_file: str | os.PathLike, img_dir: str | os.PathLike | None = None
             ) -> tuple[CocoRecords, Path]:
    """COCO records of a VOC folder or split file (see the module docstring) and the image
    folder their ``file_name`` are relative to.

    Raises:
        DatasetError: naming the file and line of malformed XML, a missing field, a
            coordinate that is not a finite number, or a class not in ``classes.txt``.
    """
    ann_file = Path(ann_file)
    files, root = _xml_files(ann_file)
    image_root = Path(img_dir) if img_dir else root / "JPEGImages"
    class_file = find_class_file(ann_file if ann_file.is_dir() else root, root)
    names = read_class_file(class_file) if class_file else None

    images: list[dict[str, Any]] = []
    objects: list[tuple[int, str, list[float], int, str]] = []
    for xml in files:
        tree, lines = _parse(xml)
        where = f"{xml}:{lines.get(tree, 1)}"
        if tree.tag != "annotation":
            raise DatasetError(f"{where}: the root element is <{tree.tag}>, not <annotation>")
        file_name = _text(tree, "filename", where)
        width = height = 0.0
        size = tree.find("size")
        if size is not None:
            s_where = f"{xml}:{lines[size]}"
            width = number(size.findtext("width", "0"), s_where, "width")
            height = number(size.findtext("height", "0"), s_where, "height")
        if width <= 0 or height <= 0:
            height, width = read_image_size(image_root / file_name, where)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": int(width),
                       "height": int(height)})
        for obj in tree.iter("object"):
            o_where = f"{xml}:{lines[obj]}"
            name = _text(obj, "name", o_where)
            box = obj.find("bndbox")
            if box is None:
                raise DatasetError(f"{o_where}: <object> has no <bndbox>")
            b_where = f"{xml}:{lines[box]}"
            coords = [number(_text(box, k, b_where), b_where, k)
                      for k in ("xmin", "ymin", "xmax", "ymax")]
            difficult = obj.findtext("difficult", "0").strip()
            objects.append((image_id, name, coords, int(difficult not in ("0", "")), o_where))

    if names is None:
        names = sorted({o[1] for o in objects})
    label_of = {n: i for i, n in enumerate(names)}
    annotations = []
    for image_id, name, (xmin, ymin, xmax, ymax), difficult, where in objects:
        if name not in label_of:
            raise DatasetError(f"{where}: class {name!r} is not in {class_file}")
        annotations.append(annotation(len(annotations) + 1, image_id, label_of[name],
                                      xmin - 1, ymin - 1, xmax, ymax, where, difficult))
    return {"images": images, "annotations": annotations,
            "categories": categories(names)}, image_root


def _fmt(v: float) -> str:
    return str(round(v))


def write_voc(coco: CocoRecords, out_dir: str | os.PathLike, split: str) -> Path:
    """Write COCO records as ``out_dir/Annotations/<stem>.xml`` (integer VOC coordinates,
    so a box moves by at most half a pixel), ``out_dir/ImageSets/Main/<split>.txt`` and
    ``out_dir/classes.txt``. Returns the split file. Images are not touched."""
    out_dir = Path(out_dir)
    names = [str(c.get("name", c["id"])) for c in sorted(coco["categories"],
                                                         key=lambda c: c["id"])]
    name_of = {c["id"]: str(c.get("name", c["id"])) for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    ids = []
    for img in coco["images"]:
        stem = Path(img["file_name"]).with_suffix("").as_posix()
        ids.append(stem)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = str(img["file_name"])
        size = ET.SubElement(root, "size")
        for tag, value in (("width", img["width"]), ("height", img["height"]), ("depth", 3)):
            ET.SubElement(size, tag).text = str(int(value))
        for ann in by_image[img["id"]]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = name_of[ann["category_id"]]
            ET.SubElement(obj, "difficult").text = str(int(bool(ann.get("iscrowd", 0))))
            box = ET.SubElement(obj, "bndbox")
            for tag, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w),
                               ("ymax", y + h)):
                ET.SubElement(box, tag).text = _fmt(value)
        ET.indent(root)
        path = out_dir / "Annotations" / f"{stem}.xml"
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    split_file = out_dir / "ImageSets" / "Main" / f"{split}.txt"
    split_file.parent.mkdir(parents=True, exist_ok=True)
    split_file.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (out_dir / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return split_file
