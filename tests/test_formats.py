"""Annotation formats: hand-made VOC / YOLO / CSV files read into the expected COCO records,
round trips A -> B -> A within 1 px with every class name in order, format detection, the
config keys, the digits exported in each format giving the COCO records and first-batch
loss, and ``o2f data check``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from o2f.cli import main
from o2f.config import load_config
from o2f.data import build_dataset, collate_train
from o2f.data.coco import DatasetError
from o2f.data.formats import convert, detect_format, read_annotations

# classes deliberately not in alphabetical order: the order must survive every format
NAMES = ["zebra", "apple", "mango"]
# per image: (file, width, height, [(class, x1, y1, x2, y2)]) in pixels
IMAGES = [
    ("a.png", 100, 80, [("zebra", 10, 5, 40, 26), ("apple", 0, 0, 100, 80)]),
    ("b.png", 64, 48, [("mango", 1, 2, 4, 6), ("zebra", 30, 10, 60, 47)]),
    ("c.png", 50, 50, []),
]


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for name, w, h, _ in IMAGES:
        Image.new("RGB", (w, h), (90, 20, 20)).save(folder / name)


def _boxes(records):
    """{file name: sorted [(class name, x1, y1, x2, y2)]} of COCO records."""
    name_of = {c["id"]: c["name"] for c in records["categories"]}
    files = {img["id"]: img["file_name"].split("/")[-1] for img in records["images"]}
    out = {f: [] for f in files.values()}
    for a in records["annotations"]:
        x, y, w, h = a["bbox"]
        out[files[a["image_id"]]].append((name_of[a["category_id"]], x, y, x + w, y + h))
    return {k: sorted(v) for k, v in out.items()}


def _class_names(records):
    return [c["name"] for c in sorted(records["categories"], key=lambda c: c["id"])]


def _expected():
    return {name: sorted(objs) for name, _, _, objs in IMAGES}


def _assert_same(records, expected, tol=1.0):
    got = _boxes(records)
    assert set(got) == set(expected)
    for name, objs in expected.items():
        assert [o[0] for o in got[name]] == [o[0] for o in objs], name
        np.testing.assert_allclose([o[1:] for o in got[name]] or np.zeros((0, 4)),
                                   [o[1:] for o in objs] or np.zeros((0, 4)), atol=tol)


def write_voc(root):
    _images(root / "JPEGImages")
    (root / "Annotations").mkdir(parents=True)
    for name, w, h, objs in IMAGES:
        xml = [f"<annotation><filename>{name}</filename>",
               f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>"]
        for cls, x1, y1, x2, y2 in objs:  # VOC: 1-based, inclusive
            xml.append(f"<object><name>{cls}</name><difficult>0</difficult><bndbox>"
                       f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax>"
                       f"<ymax>{y2}</ymax></bndbox></object>")
        xml.append("</annotation>")
        (root / "Annotations" / f"{name[:-4]}.xml").write_text("\n".join(xml))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root / "ImageSets" / "Main" / "train.txt"


def write_yolo(root):
    _images(root / "images" / "train")
    (root / "labels" / "train").mkdir(parents=True)
    for name, w, h, objs in IMAGES:
        lines = [f"{NAMES.index(c)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                 f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}" for c, x1, y1, x2, y2 in objs]
        if lines:  # c.png has no label file at all: an image without objects
            (root / "labels" / "train" / f"{name[:-4]}.txt").write_text("\n".join(lines))
    (root / "data.yaml").write_text(
        "train: images/train\nnames:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(NAMES)))
    return root / "data.yaml"


def write_csv(root):
    _images(root / "imgs")
    rows = ["image_path,xmin,ymin,xmax,ymax,label"]
    for name, _, _, objs in IMAGES:
        rows += [f"imgs/{name},{x1},{y1},{x2},{y2},{c}" for c, x1, y1, x2, y2 in objs]
        if not objs:
            rows.append(f"imgs/{name},,,,,")
    (root / "boxes.csv").write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    return root / "boxes.csv"


def write_coco(root):
    _images(root / "images")
    images, anns = [], []
    for i, (name, w, h, objs) in enumerate(IMAGES, start=1):
        images.append({"id": i, "file_name": name, "width": w, "height": h})
        for c, x1, y1, x2, y2 in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 10 + NAMES.index(c),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": 1, "iscrowd": 0})
    cats = [{"id": 10 + i, "name": n} for i, n in enumerate(NAMES)]
    path = root / "annotations" / "train.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


WRITERS = {"voc": write_voc, "yolo": write_yolo, "csv": write_csv, "coco": write_coco}


@pytest.mark.parametrize("fmt", ["voc", "yolo", "csv", "coco"])
def test_hand_made_files_read_into_the_expected_records(tmp_path, fmt):
    src = WRITERS[fmt](tmp_path / fmt)
    assert detect_format(src) == fmt
    records, root, found = read_annotations(src)
    assert found == fmt
    assert _class_names(records) == NAMES
    _assert_same(records, _expected(), tol=1e-4)  # exact (YOLO: six decimals)
    for img in records["images"]:  # sizes from <size> / headers, files where records say
        assert (root / img["file_name"]).is_file()
        assert (img["width"], img["height"]) in {(w, h) for _, w, h, _ in IMAGES}


def test_voc_annotation_folder_difficult_and_coordinates(tmp_path):
    write_voc(tmp_path)
    xml = tmp_path / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<difficult>0</difficult>",
                                           "<difficult>1</difficult>", 1))
    records, _, fmt = read_annotations(tmp_path / "Annotations")
    assert fmt == "voc"
    first = records["annotations"][0]
    assert first["bbox"] == [10, 5, 30, 21]  # xmin 11 (1-based) -> x1 10
    assert first["iscrowd"] == 1 and sum(a["iscrowd"] for a in records["annotations"]) == 1
    assert first["source"] == f"{xml}:3"


def test_yolo_label_folder_and_segment_lines(tmp_path):
    write_yolo(tmp_path)
    (tmp_path / "labels" / "classes.txt").write_text("\n".join(NAMES))
    # a segment line: the bounding box of its points
    (tmp_path / "labels" / "train" / "c.txt").write_text("2 0.1 0.2 0.5 0.2 0.3 0.6\n")
    records, root, fmt = read_annotations(tmp_path / "labels" / "train", fmt="yolo")
    assert root == tmp_path / "images" / "train"
    box = _boxes(records)["c.png"]
    assert box == [("mango", pytest.approx(5.0), pytest.approx(10.0), pytest.approx(25.0),
                    pytest.approx(30.0))]


def test_csv_without_header(tmp_path):
    write_csv(tmp_path)
    text = (tmp_path / "boxes.csv").read_text().splitlines()[1:]
    (tmp_path / "boxes.csv").write_text("\n".join(text))
    records, _, _ = read_annotations(tmp_path / "boxes.csv")
    _assert_same(records, _expected(), tol=0)


@pytest.mark.parametrize("src_fmt", ["voc", "yolo", "csv", "coco"])
@pytest.mark.parametrize("via", ["coco", "yolo", "voc"])
def test_round_trip_keeps_boxes_within_a_pixel_and_class_names(tmp_path, src_fmt, via):
    """A -> B -> A: every box within 1 px and every class name, in order."""
    src = WRITERS[src_fmt](tmp_path / "src")
    there = convert(src, via, tmp_path / "b", split="train")
    back_to = src_fmt if src_fmt != "csv" else "csv"
    back = convert(there["annotations"], back_to, tmp_path / "c", split="train")
    records, _, fmt = read_annotations(back["annotations"])
    assert fmt == src_fmt
    assert _class_names(records) == NAMES
    _assert_same(records, _expected(), tol=1.0)
    original, _, _ = read_annotations(src)
    assert len(records["annotations"]) == len(original["annotations"])


def test_cli_convert_then_check(tmp_path, capsys):
    src = write_voc(tmp_path / "voc")
    assert main(["data", "convert", "--from", "voc", "--to", "yolo", str(src),
                 "--out", str(tmp_path / "y")]) == 0
    assert "3 images, 4 boxes, 3 classes" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "y" / "data.yaml"),
                 "--out", str(tmp_path / "chk")]) == 0
    out = capsys.readouterr().out
    assert "3 images, 4 boxes, 3 classes" in out and "image without boxes" in out
    report = json.loads((tmp_path / "chk" / "check.json").read_text())
    assert [c["name"] for c in report["classes"]] == NAMES
    assert [p.split("/")[-1] for p in report["problems"]["image without boxes"]["first"]] \
        == ["c.png"]
    for picture in ("check.png", "sheet.png"):
        assert Image.open(tmp_path / "chk" / picture).size[0] > 200


def test_check_measures_crowding_and_names_problem_lines(tmp_path):
    """Two boxes of IoU 0.6 whose centres fall inside each other, one beside them; a
    degenerate box and one reaching out of the image, each named by file and line."""
    _images(tmp_path / "imgs")
    rows = ["image_path,xmin,ymin,xmax,ymax,label",
            "imgs/a.png,10,10,50,50,zebra",      # IoU with the next: 1200 / 2000 = 0.6
            "imgs/a.png,20,10,60,50,zebra",
            "imgs/a.png,70,10,80,20,apple",
            "imgs/a.png,5,5,5,9,apple",           # line 5: zero width
            "imgs/b.png,50,40,70,60,mango"]       # line 6: beyond 64 x 48
    (tmp_path / "d.csv").write_text("\n".join(rows))
    from o2f.data.check import check_dataset

    r = check_dataset(tmp_path / "d.csv", input_size=(0, 0))
    c = r["crowding"]
    assert r["num_boxes"] == 4 and c["pairs"] == 3
    assert c["pairs_iou_above_0.5"] == pytest.approx(1 / 3, abs=1e-3)
    assert c["objects_with_neighbour_iou_above_0.5"] == 0.5
    assert c["objects_centre_inside_another_box"] == 0.5
    assert r["problems"]["degenerate box (dropped)"]["first"][0].startswith(
        f"{tmp_path / 'd.csv'}:5:")
    assert r["problems"]["box partly outside its image (clipped)"]["first"][0].startswith(
        f"{tmp_path / 'd.csv'}:6:")
    # levels at native size: max side / 2 = 20, 20, 5, 10 px: all P3
    assert r["fpn_level_share"]["P3"] == 1.0


@pytest.mark.parametrize("fmt", ["voc", "yolo", "csv"])
def test_config_format_keys_detected_explicit_and_legacy(tmp_path, fmt):
    src = WRITERS[fmt](tmp_path)
    base = [f"data.train.ann_file={src}", "data.train.img_dir=", "model.num_classes=3"]
    for extra in ([], [f"data.train.format={fmt}"], [f"data.format={fmt}"]):
        ds = build_dataset(load_config("digits", base + extra), "train")
        assert ds.format == fmt and ds.class_names == NAMES and len(ds) == 2
    with pytest.raises(DatasetError, match="format must be one of"):
        build_dataset(load_config("digits", base + ["data.train.format=pascal"]), "train")


def test_errors_name_the_file_and_line(tmp_path):
    src = write_csv(tmp_path / "c")
    src.write_text(src.read_text() + "imgs/a.png,1,2,x,4,zebra\n")
    with pytest.raises(DatasetError, match=r"boxes\.csv:7: xmax is not a number: 'x'"):
        read_annotations(src)
    src = write_yolo(tmp_path / "y")
    (tmp_path / "y" / "labels" / "train" / "a.txt").write_text("0 .5 .5 .1 .1\n7 .5 .5 .1 .1\n")
    with pytest.raises(DatasetError, match=r"a\.txt:2: class '7' is not an index in 0\.\.2"):
        read_annotations(src)
    src = write_voc(tmp_path / "v")
    (tmp_path / "v" / "Annotations" / "b.xml").write_text("<annotation>\n<filename>b.png<")
    with pytest.raises(DatasetError, match=r"b\.xml:2: malformed XML"):
        read_annotations(src)


def test_digits_in_every_format_give_the_coco_records_and_first_batch_loss(tmp_path):
    from o2f.data.digits import make_digits
    from o2f.engine import create_model

    paths = make_digits(tmp_path / "digits", num_train=6, num_val=1, progress=False, workers=1)
    coco = paths["train_annotations"]
    sources = {"coco": coco}
    for fmt in ("voc", "yolo", "csv"):
        sources[fmt] = convert(coco, fmt, tmp_path / fmt, split="train",
                               img_dir=paths["train_images"])["annotations"]

    def first_batch_loss(fmt):
        cfg = load_config("digits", [f"data.train.ann_file={sources[fmt]}",
                                     f"data.train.img_dir={paths['train_images']}"
                                     if fmt == "coco" else "data.train.img_dir="])
        ds = build_dataset(cfg, "train")
        samples = [ds[i] for i in range(len(ds))]
        torch.manual_seed(0)
        model = create_model(cfg.model).train()
        images, sizes, targets = collate_train(samples[:4])
        losses = model(images, targets, image_sizes=sizes, t=0.6)
        return ds, samples, sum(losses.values()).item()

    ref_ds, ref, ref_loss = first_batch_loss("coco")
    assert ref_loss > 0
    for fmt in ("voc", "yolo", "csv"):
        ds, samples, loss = first_batch_loss(fmt)
        assert ds.format == fmt and ds.class_names == ref_ds.class_names
        assert len(samples) == len(ref)
        for (img_a, t_a), (img_b, t_b) in zip(samples, ref, strict=True):
            assert torch.equal(img_a, img_b)
            assert torch.equal(t_a["labels"], t_b["labels"])
            assert t_a["image_id"] == t_b["image_id"]
            torch.testing.assert_close(t_a["boxes"].as_subclass(torch.Tensor),
                                       t_b["boxes"].as_subclass(torch.Tensor),
                                       atol=0, rtol=0)
        assert loss == pytest.approx(ref_loss, rel=1e-5), fmt
