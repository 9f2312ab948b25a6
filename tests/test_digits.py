"""The Digits dataset: format, tight visible-ink boxes, occlusion rule, splits, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from o2f.data import digits
from o2f.data.digits import digit_split, make_digits, summarize

NUM_TRAIN, NUM_VAL = 12, 6

# pycocotools' decode trips a numpy 2 deprecation on every call; it is not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _generate(root: Path, name: str, **kwargs) -> dict[str, Path]:
    kwargs = {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "progress": False, **kwargs}
    return make_digits(root / name, **kwargs)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("digits")
    return {
        "crowd": _generate(root, "crowd", variant="crowd", seed=0, workers=2),
        # the same seed rendered in this process: the output must not depend on workers
        "crowd_again": _generate(root, "crowd_again", variant="crowd", seed=0, workers=1),
        "crowd_seed1": _generate(root, "crowd_seed1", variant="crowd", seed=1),
        "crowd_odgt": _generate(root, "crowd_odgt", variant="crowd", seed=0, fmt="odgt"),
        "sparse": _generate(root, "sparse", variant="sparse", seed=0),
    }


def _load(paths: dict[str, Path], split: str) -> dict:
    return json.loads(paths[f"{split}_annotations"].read_text())


def _iou_xywh(a: list[int], b: list[int]) -> float:
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _pair_ious(coco: dict) -> list[float]:
    by_image: dict[int, list[list[int]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    return [
        _iou_xywh(boxes[i], boxes[j])
        for boxes in by_image.values()
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
    ]


# --- hand-made cases ---------------------------------------------------------------------


def _square_digit(x: int, y: int, side: int = 10) -> digits._Digit:
    alpha = np.ones((side, side), dtype=np.float32)
    return digits._Digit(
        index=0,
        label=0,
        size=side,
        alpha=alpha,
        visible=alpha.copy(),
        ink=side * side,
        ink_box=(0, 0, side, side),
        x=x,
        y=y,
    )


def test_occlusion_hides_what_is_under_later_digits() -> None:
    # Three opaque 10x10 squares: b covers a's right 3 columns (30% of a's ink), then c
    # covers a's bottom 5 rows, of which 3x5 are already hidden: a keeps 100-30-35 = 35 px.
    a, b, c = _square_digit(0, 0), _square_digit(7, 0), _square_digit(0, 5)
    placed: list[digits._Digit] = []
    digits._paste(a, placed)
    assert digits._keeps_others_visible(b, placed)  # a would keep 70% >= MIN_VISIBLE
    digits._paste(b, placed)
    assert a.visible_fraction() == pytest.approx(0.7)
    assert not digits._keeps_others_visible(c, placed)  # a would keep 35%
    digits._paste(c, placed)
    assert a.visible_fraction() == pytest.approx(0.35)
    # b: c covers b's columns 7..9 of canvas = b's first 3 columns, rows 5..9: 15 px hidden.
    assert b.visible_fraction() == pytest.approx(0.85)
    assert c.visible_fraction() == 1.0
    ann = digits._annotate(a, width=20, height=20)
    assert ann["bbox"] == [0, 0, 7, 5]  # the visible part only
    assert ann["area"] == 35


def test_faint_ink_on_top_only_partly_hides() -> None:
    # Visible alpha multiplies: 1 x (1 - 0.6) = 0.4 > INK_THRESHOLD, so nothing is hidden;
    # a second faint layer gives 0.4 x 0.4 = 0.16 < INK_THRESHOLD, so everything is.
    a, b, c = _square_digit(0, 0), _square_digit(0, 0), _square_digit(0, 0)
    b.alpha[:] = c.alpha[:] = 0.6
    placed: list[digits._Digit] = []
    digits._paste(a, placed)
    digits._paste(b, placed)
    assert np.allclose(a.visible, 0.4) and a.visible_fraction() == 1.0
    digits._paste(c, placed)
    assert a.visible_fraction() == 0.0


def test_summarize_on_a_hand_made_file(tmp_path: Path) -> None:
    # Image 1: boxes shifted by half a width -> IoU 50/150 = 1/3; a far box -> IoU 0.
    # Image 2: two boxes shifted by 8 of 10 px -> IoU 20/180 = 0.111.
    boxes = {
        1: [[0, 0, 10, 10], [5, 0, 10, 10], [50, 50, 20, 30]],
        2: [[0, 0, 10, 10], [8, 0, 10, 10]],
    }
    anns = [
        {"id": k, "image_id": img, "category_id": 1, "bbox": box}
        for k, (img, box) in enumerate(((i, b) for i, bs in boxes.items() for b in bs), 1)
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    stats = summarize(path)
    assert stats["num_images"] == 2
    assert stats["digits_per_image"] == {"mean": 2.5, "min": 2, "max": 3}
    assert stats["overlapping_pairs"] == 2
    assert stats["iou_hist"] == [0, 1, 0, 1, 0, 0, 0, 0, 0, 0]
    assert stats["frac_iou_0.3_0.7"] == 0.5
    assert stats["box_width"]["mean"] == pytest.approx(60 / 5)


# --- splits ------------------------------------------------------------------------------


def test_digit_split_is_fixed_disjoint_and_stratified() -> None:
    split = digit_split()
    train, val = split["train"], split["val"]
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == 1797
    assert np.array_equal(val, digit_split()["val"])
    _, labels = digits._digits()
    per_class_val = np.bincount(labels[val], minlength=10) / np.bincount(labels, minlength=10)
    assert np.allclose(per_class_val, 0.2, atol=0.01)


def test_train_and_val_use_disjoint_digit_instances(datasets) -> None:
    split = digit_split()
    for name in ("crowd", "sparse"):
        train = {a["digit_index"] for a in _load(datasets[name], "train")["annotations"]}
        val = {a["digit_index"] for a in _load(datasets[name], "val")["annotations"]}
        assert train and val and not train & val
        assert train <= set(split["train"].tolist())
        assert val <= set(split["val"].tolist())


# --- format and geometry -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["crowd", "sparse"])
def test_boxes_are_tight_on_the_visible_ink_mask(datasets, name: str) -> None:
    paths = datasets[name]
    for split in ("train", "val"):
        coco = _load(paths, split)
        images = {img["id"]: img for img in coco["images"]}
        assert len(images) == (NUM_TRAIN if split == "train" else NUM_VAL)
        for ann in coco["annotations"]:
            img = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10
            rle = ann["segmentation"]
            assert isinstance(rle["counts"], str)
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() == ann["area"] == mask_utils.area(rle)
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert np.abs(np.array(tight) - np.array(ann["bbox"])).max() <= 1


def test_ink_under_the_masks_contrasts_with_the_background(datasets) -> None:
    paths = datasets["crowd"]
    coco = _load(paths, "val")
    for img in coco["images"]:
        pixels = np.asarray(Image.open(paths["val_images"] / img["file_name"]), dtype=float)
        assert pixels.shape == (img["height"], img["width"], 3)
        luma = pixels @ np.array([0.299, 0.587, 0.114])
        background = np.median(luma)
        for ann in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
            rle = ann["segmentation"]
            mask = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            assert abs(luma[mask.astype(bool)].mean() - background) > 40


def test_pycocotools_loads_the_json_and_categories_are_the_digits(datasets, tmp_path) -> None:
    coco = COCO(str(datasets["crowd"]["train_annotations"]))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert [c["name"] for c in coco.loadCats(list(range(1, 11)))] == [str(i) for i in range(10)]
    assert len(coco.getImgIds()) == NUM_TRAIN
    for ann in coco.loadAnns(coco.getAnnIds()):
        digit_label = int(digits._digits()[1][ann["digit_index"]])
        assert ann["category_id"] == digit_label + 1

    single = _generate(tmp_path, "single", variant="sparse", num_train=2, single_class=True)
    data = _load(single, "train")
    assert data["categories"] == [{"id": 1, "name": "digit", "supercategory": "digit"}]
    assert {a["category_id"] for a in data["annotations"]} == {1}


def test_odgt_has_the_coco_boxes_and_pixels(datasets) -> None:
    coco_paths, odgt_paths = datasets["crowd"], datasets["crowd_odgt"]
    assert odgt_paths["train_images"] == odgt_paths["val_images"]
    assert odgt_paths["train_images"].name == "Images"
    for split in ("train", "val"):
        coco = _load(coco_paths, split)
        lines = odgt_paths[f"{split}_annotations"].read_text().splitlines()
        assert len(lines) == len(coco["images"])
        for line, img in zip(lines, coco["images"], strict=True):
            record = json.loads(line)
            assert record["ID"] + ".png" == img["file_name"]
            assert (record["width"], record["height"]) == (img["width"], img["height"])
            boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == img["id"]]
            assert [g["fbox"] for g in record["gtboxes"]] == boxes
            assert [g["vbox"] for g in record["gtboxes"]] == boxes
            assert all(
                g["tag"] == "person" and g["extra"]["ignore"] == 0 for g in record["gtboxes"]
            )
            png = odgt_paths["train_images"] / f"{record['ID']}.png"
            assert (
                png.read_bytes() == (coco_paths[f"{split}_images"] / img["file_name"]).read_bytes()
            )


# --- the two variants --------------------------------------------------------------------


def test_sparse_digits_never_overlap(datasets) -> None:
    coco = _load(datasets["sparse"], "train")
    ious = _pair_ious(coco)
    assert ious and max(ious) == 0.0
    counts = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=NUM_TRAIN + 1)
    assert counts[1:].min() >= 2 and counts.max() <= 6


def test_crowd_digits_overlap_heavily(datasets) -> None:
    coco = _load(datasets["crowd"], "train")
    ious = np.array(_pair_ious(coco))
    overlapping = ious[ious > 0]
    assert len(coco["annotations"]) / NUM_TRAIN >= 8
    assert ((overlapping >= 0.3) & (overlapping <= 0.7)).mean() >= 0.2
    # Every annotated digit keeps at least MIN_VISIBLE of its ink, so boxes never coincide.
    assert ious.max() < 0.9


# --- determinism -------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(datasets, tmp_path) -> None:
    # "crowd" was rendered by two worker processes, "crowd_again" by this one
    a, b, c = datasets["crowd"], datasets["crowd_again"], datasets["crowd_seed1"]
    for split in ("train", "val"):
        assert a[f"{split}_annotations"].read_bytes() == b[f"{split}_annotations"].read_bytes()
        assert a[f"{split}_annotations"].read_bytes() != c[f"{split}_annotations"].read_bytes()
        names = sorted(p.name for p in a[f"{split}_images"].glob("*.png"))
        assert names == sorted(p.name for p in b[f"{split}_images"].glob("*.png"))
        for name in names:
            png_a = (a[f"{split}_images"] / name).read_bytes()
            assert png_a == (b[f"{split}_images"] / name).read_bytes()
            assert png_a != (c[f"{split}_images"] / name).read_bytes()
    # Each image has its own generator: fewer images give a prefix of the same dataset.
    few = _generate(tmp_path, "few", variant="crowd", seed=0, num_train=3, num_val=1)
    for name in ("train_000000.png", "train_000002.png"):
        assert (few["train_images"] / name).read_bytes() == (a["train_images"] / name).read_bytes()
    assert _load(few, "val")["annotations"] == [
        ann for ann in _load(a, "val")["annotations"] if ann["image_id"] == 1
    ]


def test_bad_arguments_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="variant"):
        make_digits(tmp_path, variant="dense", progress=False)
    with pytest.raises(ValueError, match="fmt"):
        make_digits(tmp_path, fmt="voc", progress=False)
