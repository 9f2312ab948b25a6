"""coco_evaluate must give pycocotools' twelve numbers, computed here side by side."""

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval

from o2f.evaluation.coco import (
    STAT_NAMES,
    coco_evaluate,
    format_per_class,
    per_class_ap,
)

CATS = [{"id": 42, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]


def make_case(seed: int = 0, n_images: int = 40):
    """Ground truth with non-contiguous category ids, crowd boxes, empty images and boxes of
    every COCO size range; detections = jittered copies of the gts plus false positives."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for img_id in range(1, n_images + 1):
        w, h = int(rng.integers(300, 640)), int(rng.integers(300, 640))
        images.append({"id": img_id * 10, "file_name": f"{img_id}.jpg", "width": w, "height": h})
        n_gt = 0 if img_id % 7 == 0 else int(rng.integers(1, 9))
        for _ in range(n_gt):
            ranges = [rng.uniform(4, 30), rng.uniform(35, 90), rng.uniform(100, 180)]
            side = float(rng.choice(ranges))
            bw, bh = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.choice([3, 7, 42]))
            crowd = int(rng.random() < 0.1)
            anns.append({
                "id": len(anns) + 1, "image_id": img_id * 10, "category_id": cat,
                "bbox": [x, y, bw, bh], "area": bw * bh * rng.uniform(0.5, 1.0),
                "iscrowd": crowd,
            })
            for _ in range(int(rng.integers(0, 3))):  # near-duplicates / localisation errors
                jit = rng.normal(0, 0.08 * side, 4)
                dets.append({
                    "image_id": img_id * 10,
                    "category_id": cat if rng.random() < 0.85 else int(rng.choice([3, 7, 42])),
                    "bbox": [x + jit[0], y + jit[1], max(bw + jit[2], 1.0), max(bh + jit[3], 1.0)],
                    "score": float(rng.random()),
                })
        n_fp = 130 if img_id == 3 else int(rng.integers(0, 6))  # image 3 exceeds maxDets=100
        for _ in range(n_fp):
            bw, bh = rng.uniform(3, 150, 2)
            dets.append({
                "image_id": img_id * 10, "category_id": int(rng.choice([3, 7, 42])),
                "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                "score": float(rng.random() * 0.7),
            })
    gt = {"images": images, "annotations": anns, "categories": CATS}
    return gt, dets


def pycocotools_eval(gt: dict, dets: list) -> PyCOCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = PyCOCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = PyCOCOeval(coco, coco.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.fixture(scope="module")
def case():
    gt, dets = make_case()
    return gt, dets, pycocotools_eval(gt, dets)


def test_equals_pycocotools(case):
    gt, dets, ref = case
    ours = coco_evaluate(gt, dets)
    assert list(ours) == list(STAT_NAMES)
    assert all(isinstance(v, float) for v in ours.values())
    for name, expected in zip(STAT_NAMES, ref.stats, strict=True):
        assert math.isclose(ours[name], expected, rel_tol=0, abs_tol=1e-9), name
    # the fixture is not degenerate: every size range is populated and AP is neither 0 nor 1
    assert all(0.05 < ours[k] < 0.95 for k in ("AP", "APs", "APm", "APl", "AR100"))
    assert ours["AR1"] < ours["AR10"] <= ours["AR100"]


def test_inputs_as_files_and_coco_objects(case, tmp_path):
    gt, dets, ref = case
    gt_file, det_file = tmp_path / "gt.json", tmp_path / "dets.json"
    gt_file.write_text(json.dumps(gt))
    det_file.write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        py_coco = PyCOCO(str(gt_file))
    for gt_input in (gt_file, str(gt_file), py_coco, gt):
        ours = coco_evaluate(gt_input, det_file)
        assert [ours[k] for k in STAT_NAMES] == pytest.approx(list(ref.stats), abs=1e-9)
    coco_evaluate(py_coco, dets)
    # the caller's dicts are not modified
    assert "id" not in dets[0] and "area" not in dets[0]
    assert "ignore" not in gt["annotations"][0]
    assert "ignore" not in py_coco.dataset["annotations"][0]


def test_results_out_written(case, tmp_path):
    gt, dets, _ = case
    out = tmp_path / "sub" / "results.json"
    coco_evaluate(gt, dets[:50], results_out=out)
    assert json.loads(out.read_text()) == dets[:50]


def test_per_class_ap_matches_precision_table(case, capsys):
    gt, dets, ref = case
    coco_evaluate(gt, dets, print_per_class=True)
    table = capsys.readouterr().out
    for name in ("car", "train", "kite"):
        assert name in table
    # per-class AP = mean of pycocotools' precision over IoU thresholds and recall points
    p = ref.eval["precision"][:, :, :, 0, -1]
    expected = {name: float(np.mean(p[:, :, k][p[:, :, k] > -1]))
                for k, name in enumerate(["car", "train", "kite"])}  # sorted ids 3, 7, 42

    from faster_coco_eval import COCO, COCOeval_faster

    coco = COCO(copy.deepcopy(gt))
    ev = COCOeval_faster(coco, coco.loadRes(copy.deepcopy(dets)), "bbox",
                         print_function=lambda *a: None, separate_eval=True)
    ev.evaluate()
    ev.accumulate()
    ours = per_class_ap(ev)
    assert list(ours) == ["car", "train", "kite"]
    assert ours == pytest.approx(expected, abs=1e-12)
    text = format_per_class(ours)
    assert f"{100 * ours['kite']:.1f}" in text


def test_empty_detections_give_zeros(case, tmp_path):
    gt, _, _ = case
    assert coco_evaluate(gt, []) == dict.fromkeys(STAT_NAMES, 0.0)
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert coco_evaluate(gt, empty) == dict.fromkeys(STAT_NAMES, 0.0)


def test_unknown_image_id_is_an_error(case):
    gt, dets, _ = case
    bad = dets[:3] + [dict(dets[0], image_id=999999)]
    with pytest.raises(ValueError, match="999999"):
        coco_evaluate(gt, bad)


def test_missing_size_range_is_minus_one_like_pycocotools():
    gt, dets = make_case(seed=1, n_images=10)
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] > 96**2]  # large only
    ref = pycocotools_eval(gt, dets)
    ours = coco_evaluate(gt, dets)
    assert ours["APs"] == -1.0 and ours["ARm"] == -1.0
    assert [ours[k] for k in STAT_NAMES] == pytest.approx(list(ref.stats), abs=1e-9)
