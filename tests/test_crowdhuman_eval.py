"""The CrowdHuman metrics on hand-made cases (expected numbers worked out below), then a
random cross-check against a slow, literal per-image implementation."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from PIL import Image

from o2f.data.crowdhuman import load_odgt, odgt_to_coco, write_odgt
from o2f.evaluation.crowdhuman import crowdhuman_evaluate

EPS = 1e-6


def person(x, y, w, h, ignore=0):
    return {"tag": "person", "fbox": [x, y, w, h], "extra": {"ignore": ignore}}


def mask(x, y, w, h):
    return {"tag": "mask", "fbox": [x, y, w, h]}


def det(x, y, w, h, score):
    return {"box": [x, y, w, h], "score": score, "tag": 1}


def gt_record(key, boxes, height=100, width=200):
    return {"ID": key, "height": height, "width": width, "gtboxes": boxes}


def evaluate(gt, dt, **kwargs):
    # Any warning (log(0), 0/0, ...) leaking out of the evaluation fails the test.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return crowdhuman_evaluate(gt, dt, **kwargs)


# --------------------------------------------------------------------------------------------
# hand-made cases


def test_perfect_detector():
    # 4 + 2 persons, each detected exactly once with distinct scores.
    boxes = {"a": [person(10 + 40 * i, 10, 30, 60) for i in range(4)],
             "b": [person(20, 20, 50, 70), person(120, 10, 40, 80)]}
    gt = [gt_record(k, v) for k, v in boxes.items()]
    scores = iter(np.linspace(0.95, 0.5, 6))
    dt = [{"ID": k, "dtboxes": [det(*b["fbox"], float(next(scores))) for b in v]}
          for k, v in boxes.items()]
    m = evaluate(gt, dt)
    # Precision 1 at recall 1/6 .. 6/6; no point at recall 0, so the first sixth is lost.
    assert m["AP"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["MR"] == 0.0  # miss rate 0 at every FPPI point (no false positive at all)
    assert m["recall"] == 1.0
    # per image k / (m + n - k + eps) with k = m = n
    assert m["JI"] == pytest.approx((4 / (4 + EPS) + 2 / (2 + EPS)) / 2, abs=1e-15)


def test_one_duplicate_per_person():
    # Each person's duplicate comes right after it: TP, FP, TP, FP in one image.
    gt = [gt_record("a", [person(10, 10, 30, 60), person(100, 10, 30, 60)])]
    dt = [{"ID": "a", "dtboxes": [det(10, 10, 30, 60, 0.9), det(11, 11, 30, 60, 0.89),
                                  det(100, 10, 30, 60, 0.8), det(101, 11, 30, 60, 0.79)]}]
    m = evaluate(gt, dt)
    # recall .5 .5 1 1, precision 1 1/2 2/3 1/2: one trapezoid of width 1/2
    assert m["AP"] == pytest.approx(0.5 * (1 / 2 + 2 / 3) / 2, abs=1e-12)
    # FPPI 0 1 1 2 (one image): every point, even 10^0, reads at the first FP: miss rate 1/2
    assert m["MR"] == pytest.approx(0.5, abs=1e-12)
    assert m["recall"] == 1.0
    # thresholds 0.0-0.7 keep all four: 2 / (2 + 4 - 2); 0.8 keeps TP+FP: 1 / (2 + 2 - 1)
    assert m["JI"] == pytest.approx(2 / (4 + EPS), abs=1e-15)


def test_ignore_regions():
    # Persons A, B, C (C lies inside the mask M and is never detected), a mask M, and a
    # person-tagged box I with extra.ignore = 1: M and I are both ignore regions.
    gt = [gt_record("a", [person(0, 0, 20, 40), person(100, 0, 20, 40), person(60, 5, 10, 10),
                          mask(50, 0, 40, 40), person(150, 0, 30, 40, ignore=1)])]
    dt = [{"ID": "a", "dtboxes": [
        det(0, 0, 20, 40, 0.9),  # A: TP
        det(55, 5, 20, 20, 0.85),  # inside M (IoU with C is 0.25): ignored
        det(150, 0, 30, 40, 0.8),  # exactly I: ignored, not a TP
        det(30, 0, 40, 40, 0.75),  # exactly half of its area in M: not > 0.5, so a FP
        det(100, 0, 20, 40, 0.7),  # B: TP
    ]}]
    m = evaluate(gt, dt)
    # kept: TP FP TP over 3 persons: recall 1/3 1/3 2/3, precision 1 1/2 2/3
    assert m["AP"] == pytest.approx((1 / 3) * (1 / 2 + 2 / 3) / 2, abs=1e-12)
    assert m["MR"] == pytest.approx(2 / 3, abs=1e-12)  # all points read after the FP
    assert m["recall"] == pytest.approx(2 / 3, abs=1e-12)
    # JI at 0.0: k = 2; n = 5 - 2 dets in M / I = 3; m = 3 - C (unmatched, inside M) = 2.
    # (0.8 gives 1 / (2 + 1 - 1) = 0.5; counting C would make 0.0 give 2 / 4 = 0.5.)
    assert m["JI"] == pytest.approx(2 / (2 + 3 - 2 + EPS), abs=1e-15)


@pytest.mark.parametrize("order, expected_ap", [("ab", (1 / 3) * (1 / 2 + 2 / 3) / 2),
                                                 ("ba", 1 / 3)])
def test_score_ties_follow_gt_file_order(order, expected_ap):
    # Image a: persons P1, P2; P1 found at 0.9 and a FP at 0.5. Image b: P3 found at 0.5.
    records = {"a": gt_record("a", [person(0, 0, 20, 40), person(100, 0, 20, 40)]),
               "b": gt_record("b", [person(0, 0, 20, 40)])}
    gt = [records[k] for k in order]
    dt = [{"ID": "a", "dtboxes": [det(0, 0, 20, 40, 0.9), det(50, 50, 20, 40, 0.5)]},
          {"ID": "b", "dtboxes": [det(0, 0, 20, 40, 0.5)]}]
    m = evaluate(gt, dt)
    # a first: TP FP TP -> recall 1/3 1/3 2/3, precision 1 1/2 2/3
    # b first: TP TP FP -> recall 1/3 2/3 2/3, precision 1 1 2/3: one unit-height trapezoid
    assert m["AP"] == pytest.approx(expected_ap, abs=1e-12)


def test_score_ties_within_an_image_keep_box_order():
    # P and Q overlap; D2 fits P best (IoU .905) and Q too (.739); D1 fits only P (.739).
    gt = [gt_record("a", [person(10, 0, 20, 40), person(14, 0, 20, 40)])]
    d1, d2 = det(7, 0, 20, 40, 0.5), det(11, 0, 20, 40, 0.5)
    # Far-away false positives, many with the same score: enough boxes for an unstable sort
    # to reorder the ties.
    fill = [det(100 + 3 * i, 50, 20, 40, (0.9, 0.5, 0.1)[i % 3]) for i in range(12)]
    # D1 first takes P, then D2 takes Q: both TPs.
    assert evaluate(gt, [{"ID": "a", "dtboxes": fill + [d1, d2] + fill}])["recall"] == 1.0
    # D2 first takes P, and D1's only candidate is gone: a FP.
    assert evaluate(gt, [{"ID": "a", "dtboxes": fill + [d2, d1] + fill}])["recall"] == 0.5


def test_asymmetric_clipping():
    # 100 x 100 image. x1/y1 are clipped to [0, 99], x2/y2 to [0, 100].
    def recall(gt_box, dt_box):
        gt = [gt_record("a", [person(*gt_box)], height=100, width=100)]
        return evaluate(gt, [{"ID": "a", "dtboxes": [det(*dt_box, 0.9)]}])["recall"]

    # unclipped IoU 1/3; both clip to x 90..100: a match
    assert recall([90, 0, 30, 40], [90, 0, 10, 40]) == 1.0
    # both far right of the image, not even overlapping: both become the sliver x 99..100
    assert recall([120, 0, 30, 40], [200, 0, 10, 40]) == 1.0
    # ... and below it
    assert recall([0, 130, 30, 40], [0, 300, 30, 40]) == 1.0
    # far left: both collapse to x 0..0, zero area, IoU 0: no match
    assert recall([-50, 0, 30, 40], [-50, 0, 30, 40]) == 0.0


def test_strict_iou_threshold():
    gt = [gt_record("a", [person(0, 0, 20, 40)])]
    half = [{"ID": "a", "dtboxes": [det(0, 0, 10, 40, 0.9)]}]  # IoU exactly 400 / 800
    m = evaluate(gt, half)
    assert m["recall"] == 0.0 and m["JI"] == 0.0
    just_over = [{"ID": "a", "dtboxes": [det(0, 0, 10.01, 40, 0.9)]}]
    assert evaluate(gt, just_over)["recall"] == 1.0


def test_ji_score_threshold_is_strict():
    # TP at 0.95, FP at exactly 0.9 (= 0.1 * 9): the 0.9 threshold drops the FP.
    gt = [gt_record("a", [person(0, 0, 20, 40)])]
    dt = [{"ID": "a", "dtboxes": [det(0, 0, 20, 40, 0.95), det(100, 0, 20, 40, 0.9)]}]
    # score >= 0.9 would keep both at every threshold: 1 / (1 + 2 - 1) = 0.5 at best
    assert evaluate(gt, dt)["JI"] == pytest.approx(1 / (1 + EPS), abs=1e-15)


def test_fppi_points_read_at_first_reaching_detection():
    # Ten images: i0 holds 4 persons, i1..i9 none. Kept detections by score:
    #   TP FP TP FP FP TP FP FP FP FP FP FP  (the FPs one per empty image)
    gt = [gt_record("i0", [person(40 * j, 0, 30, 60) for j in range(4)])]
    gt += [gt_record(f"i{j}", []) for j in range(1, 10)]
    kinds = "TFTFFTFFFFFF"
    scores = [0.9 - 0.05 * j for j in range(len(kinds))]
    tps = [det(40 * j, 0, 30, 60, s) for j, s in
           enumerate(s for s, k in zip(scores, kinds, strict=True) if k == "T")]
    fps = [{"ID": f"i{j + 1}", "dtboxes": [det(10, 10, 30, 60, s)]} for j, s in
           enumerate(s for s, k in zip(scores, kinds, strict=True) if k == "F")]
    m = evaluate(gt, [{"ID": "i0", "dtboxes": tps}, *fps])
    # FPPI after each: 0 .1 .1 .2 .3 .3 .4 .5 .6 .7 .8 .9; miss rate .75 .75 .5 .5 .5 .25 ...
    # points .01-.1 -> index 1 (.75); .1778 -> index 3 (.5); .3162 -> index 6 (.25, since
    # .3 < .3162); .5623 -> index 8 (.25); 1.0 never reached -> the last (.25).
    expected = math.exp((5 * math.log(0.75) + math.log(0.5) + 3 * math.log(0.25)) / 9)
    assert m["MR"] == pytest.approx(expected, abs=1e-12)
    assert m["recall"] == 0.75
    # recall steps .25 -> .5 (precision 1/2 -> 2/3) and .5 -> .75 (2/5 -> 1/2)
    assert m["AP"] == pytest.approx(0.25 * (1 / 2 + 2 / 3) / 2 + 0.25 * (2 / 5 + 1 / 2) / 2,
                                    abs=1e-12)


@pytest.mark.parametrize("missing", ["no_record", "empty_record"])
def test_images_without_detections(missing):
    gt = [gt_record("a", [person(0, 0, 20, 40)]), gt_record("b", [person(0, 0, 20, 40)])]
    dt = [{"ID": "a", "dtboxes": [det(0, 0, 20, 40, 0.9)]}]
    if missing == "empty_record":
        dt.append({"ID": "b", "dtboxes": []})
    m = evaluate(gt, dt)
    assert m["AP"] == 0.0  # a single precision/recall point encloses no area
    assert m["recall"] == 0.5
    assert m["MR"] == pytest.approx(0.5, abs=1e-12)  # FPPI never reaches a point: last one
    # a: 1 / (1 + 1 - 1); b: k = 0, m = 1, n = 0 -> 0; both count in the mean
    assert m["JI"] == pytest.approx((1 / (1 + EPS)) / 2, abs=1e-15)


def test_images_with_empty_gtboxes():
    gt = [gt_record("a", [person(0, 0, 20, 40), person(100, 0, 20, 40)]),
          gt_record("b", []), gt_record("c", [])]
    dt = [{"ID": "a", "dtboxes": [det(0, 0, 20, 40, 0.9), det(100, 0, 20, 40, 0.7)]},
          {"ID": "b", "dtboxes": [det(0, 0, 20, 40, 0.8)]}]
    m = evaluate(gt, dt)
    # TP FP TP: recall .5 .5 1, precision 1 1/2 2/3
    assert m["AP"] == pytest.approx(0.5 * (1 / 2 + 2 / 3) / 2, abs=1e-12)
    assert m["recall"] == 1.0
    # FPPI 0 1/3 1/3: points up to .3162 read .5, the two above are never reached and read
    # the last miss rate, 0 -- and one zero makes the log-average 0.
    assert m["MR"] == 0.0
    # a: 2 / 2; b: k = 0, m = 0, n = 1 -> 0; c: m = n = 0, left out of the mean
    assert m["JI"] == pytest.approx((2 / (2 + EPS)) / 2, abs=1e-15)


def test_no_detections_at_all():
    gt = [gt_record("a", [person(0, 0, 20, 40), mask(50, 0, 30, 30)]), gt_record("b", [])]
    for dt in ([], [{"ID": "a", "dtboxes": []}]):
        m = evaluate(gt, dt)
        assert m == {"AP": 0.0, "MR": 1.0, "recall": 0.0, "JI": 0.0}
    # nothing to find and nothing found: the same (worst) numbers, not NaN
    m = evaluate([gt_record("a", [])], [])
    assert m == {"AP": 0.0, "MR": 1.0, "recall": 0.0, "JI": 0.0}


def test_only_ignored_detections_is_no_detection():
    gt = [gt_record("a", [person(0, 0, 20, 40), mask(50, 0, 30, 30)])]
    m = evaluate(gt, [{"ID": "a", "dtboxes": [det(55, 5, 10, 10, 0.9)]}])
    assert m["AP"] == 0.0 and m["MR"] == 1.0 and m["recall"] == 0.0
    assert m["JI"] == 0.0  # k = 0, m = 1, n = 1 - 1 ignored = 0


# --------------------------------------------------------------------------------------------
# files, sizes and errors


def test_paths_and_records_agree(tmp_path):
    gt = [gt_record("a", [person(0, 0, 20, 40), person(100, 0, 20, 40)])]
    dt = [{"ID": "a", "dtboxes": [det(0, 0, 20, 40, 0.9), det(3, 50, 20, 40, 0.8),
                                  det(100, 0, 20, 40, 0.7)]}]
    write_odgt(gt, tmp_path / "gt.odgt")
    write_odgt(dt, tmp_path / "dt.odgt")
    assert load_odgt(tmp_path / "gt.odgt") == gt
    assert evaluate(tmp_path / "gt.odgt", str(tmp_path / "dt.odgt")) == evaluate(gt, dt)


def test_missing_sizes_error_names_file_and_image(tmp_path):
    gt_path = tmp_path / "val.odgt"
    write_odgt([{"ID": "273271,c9db000d5146c15", "gtboxes": [person(0, 0, 20, 40)]}], gt_path)
    with pytest.raises(ValueError, match=r"val\.odgt:1: no size for image '273271,c9db"):
        crowdhuman_evaluate(gt_path, [])
    with pytest.raises(ValueError, match="273271,c9db000d5146c15"):
        crowdhuman_evaluate(gt_path, [], image_dir=tmp_path)  # folder without the image


def test_sizes_from_dict_and_from_images_with_cache(tmp_path):
    gt = [{"ID": "im1", "gtboxes": [person(90, 0, 30, 40)]}]  # clipping needs the width
    dt = [{"ID": "im1", "dtboxes": [det(90, 0, 10, 40, 0.9)]}]
    assert evaluate(gt, dt, image_sizes={"im1": (100, 100)})["recall"] == 1.0
    assert evaluate(gt, dt, image_sizes={"im1": (100, 200)})["recall"] == 0.0

    gt_path, images = tmp_path / "val.odgt", tmp_path / "Images"
    write_odgt(gt, gt_path)
    images.mkdir()
    Image.new("RGB", (100, 60)).save(images / "im1.jpg")  # PIL: (width, height)
    assert evaluate(gt_path, dt, image_dir=images)["recall"] == 1.0
    cache = tmp_path / "val.odgt.sizes.json"
    assert json.loads(cache.read_text()) == {"im1": [60, 100]}
    (images / "im1.jpg").unlink()  # read once: the cache now answers
    assert evaluate(gt_path, dt, image_dir=images)["recall"] == 1.0


def test_sizes_from_detection_records():
    # The reference reads width/height from whichever file has them first.
    gt = [{"ID": "im1", "gtboxes": [person(90, 0, 30, 40)]}]
    dt = [{"ID": "im1", "height": 100, "width": 100, "dtboxes": [det(90, 0, 10, 40, 0.9)]}]
    assert evaluate(gt, dt)["recall"] == 1.0


def test_malformed_lines_are_reported_with_file_and_line(tmp_path):
    good = json.dumps(gt_record("a", [person(0, 0, 20, 40)]))
    (tmp_path / "gt.odgt").write_text(good + "\n" + '{"ID": "b", "gtboxes": [\n')
    with pytest.raises(ValueError, match=r"gt\.odgt:2: malformed JSON"):
        crowdhuman_evaluate(tmp_path / "gt.odgt", [])
    (tmp_path / "gt.odgt").write_text(good + "\n")
    (tmp_path / "dt.odgt").write_text('{"ID": "a", "dtboxes": []}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"dt\.odgt:3: expected a JSON object with an 'ID'"):
        crowdhuman_evaluate(tmp_path / "gt.odgt", tmp_path / "dt.odgt")
    (tmp_path / "dt.odgt").write_text('{"ID": "a", "dtboxes": [{"box": [1, 2, 3]}]}\n')
    with pytest.raises(ValueError, match=r"dt\.odgt:1: every 'box' must be 4 numbers"):
        crowdhuman_evaluate(tmp_path / "gt.odgt", tmp_path / "dt.odgt")
    (tmp_path / "dt.odgt").write_text('{"ID": "a", "dtboxes": [{"box": [1, 2, 3, 4]}]}\n')
    with pytest.raises(ValueError, match=r"dt\.odgt:1: every dtbox needs 'box' and 'score'"):
        crowdhuman_evaluate(tmp_path / "gt.odgt", tmp_path / "dt.odgt")


def test_unknown_or_repeated_detection_images_are_errors():
    gt = [gt_record("a", [person(0, 0, 20, 40)])]
    with pytest.raises(ValueError, match=r"\[0\]: image 'zz' is not in the ground truth"):
        crowdhuman_evaluate(gt, [{"ID": "zz", "dtboxes": []}])
    with pytest.raises(ValueError, match=r"\[1\]: image 'a' repeats the record at"):
        crowdhuman_evaluate(gt, [{"ID": "a", "dtboxes": []}, {"ID": "a", "dtboxes": []}])


def test_odgt_to_coco(tmp_path):
    write_odgt([{"ID": "x1", "gtboxes": [person(1, 2, 30, 40), mask(5, 5, 10, 10),
                                         person(0, 0, 8, 8, ignore=1)]},
                {"ID": "x2", "width": 50, "height": 40, "gtboxes": []}], tmp_path / "a.odgt")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "img" / "x1.png")
    coco = odgt_to_coco(tmp_path / "a.odgt", tmp_path / "img", tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == coco
    assert coco["images"] == [
        {"id": 1, "file_name": "x1.png", "width": 64, "height": 48},
        {"id": 2, "file_name": "x2.jpg", "width": 50, "height": 40}]
    assert [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"])
            for a in coco["annotations"]] == [(1, 1, [1, 2, 30, 40], 0), (1, 1, [5, 5, 10, 10], 1),
                                              (1, 1, [0, 0, 8, 8], 1)]
    assert coco["categories"] == [{"id": 1, "name": "person"}]


# --------------------------------------------------------------------------------------------
# random cross-check against a literal implementation


def _slow_reference(gt, dt):
    """The protocol written out box by box with Python floats; brute-force JI matching."""

    def xyxy(b, h, w):
        x1, y1, x2, y2 = b[0], b[1], b[0] + b[2], b[1] + b[3]
        return (min(max(x1, 0), w - 1), min(max(y1, 0), h - 1),
                max(min(x2, w), 0), max(min(y2, h), 0))

    def inter(a, b):
        iw, ih = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
        return max(iw, 0) * max(ih, 0)

    def iou(a, b):
        i = inter(a, b)
        return i / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - i + EPS)

    def ioa(a, b):
        return inter(a, b) / (max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + EPS)

    dets = {r["ID"]: r["dtboxes"] for r in dt}
    kept, num_persons, ji = [], 0, {t: [] for t in range(10)}
    for img_index, rec in enumerate(gt):
        h, w = rec["height"], rec["width"]
        persons = [xyxy(b["fbox"], h, w) for b in rec["gtboxes"]
                   if b["tag"] == "person" and b.get("extra", {}).get("ignore", 0) == 0]
        regions = [xyxy(b["fbox"], h, w) for b in rec["gtboxes"]
                   if not (b["tag"] == "person" and b.get("extra", {}).get("ignore", 0) == 0)]
        num_persons += len(persons)
        boxes = [(xyxy(d["box"], h, w), d["score"], i) for i, d in enumerate(dets[rec["ID"]])]
        boxes.sort(key=lambda d: -d[1])
        taken = set()
        for box, score, i in boxes:
            best, best_j = 0.5, None
            for j, p in enumerate(persons):
                if j not in taken and iou(box, p) > best:
                    best, best_j = iou(box, p), j
            if best_j is not None:
                taken.add(best_j)
                kept.append((-score, img_index, i, 1))
            elif not any(ioa(box, r) > 0.5 for r in regions):
                kept.append((-score, img_index, i, 0))
        for t in range(10):
            ds = [b for b, s, _ in boxes if s > 0.1 * t]
            best_weight, best_pairs = 0.0, []
            # every injective partial assignment of detections to persons with IoU > 0.5
            for targets in itertools.product(range(-1, len(persons)), repeat=len(ds)):
                used = [j for j in targets if j >= 0]
                if len(used) != len(set(used)):
                    continue
                pairs = [(i, j) for i, j in enumerate(targets) if j >= 0]
                if any(iou(ds[i], persons[j]) <= 0.5 for i, j in pairs):
                    continue
                weight = sum(iou(ds[i], persons[j]) for i, j in pairs)
                if weight > best_weight:
                    best_weight, best_pairs = weight, pairs
            k = len(best_pairs)
            md, mg = {i for i, _ in best_pairs}, {j for _, j in best_pairs}
            n = len(ds) - sum(1 for i, d in enumerate(ds)
                              if i not in md and any(ioa(d, r) > 0.5 for r in regions))
            m = len(persons) - sum(1 for j, p in enumerate(persons)
                                   if j not in mg and any(ioa(p, r) > 0.5 for r in regions))
            ji[t].append((k / (m + n - k + EPS), m != 0 or n != 0))
    kept.sort()
    tp = fp = 0
    recall, precision, fppi = [], [], []
    for *_, is_tp in kept:
        tp, fp = tp + is_tp, fp + (1 - is_tp)
        recall.append(tp / num_persons)
        precision.append(tp / (tp + fp))
        fppi.append(fp / len(gt))
    ap = sum((recall[i] - recall[i - 1]) * (precision[i - 1] + precision[i]) / 2
             for i in range(1, len(kept)))
    logs = []
    for point in (0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000):
        i = next((i for i, f in enumerate(fppi) if f >= point), len(fppi) - 1)
        logs.append(math.log(1 - recall[i]) if recall[i] < 1 else -math.inf)
    mr = math.exp(sum(logs) / len(logs))
    best_ji = max(sum(r for r, _ in v) / max(sum(c for _, c in v), 1) for v in ji.values())
    return {"AP": ap, "MR": mr, "recall": recall[-1], "JI": best_ji}


@pytest.mark.parametrize("seed", range(6))
def test_matches_slow_reference_on_random_scenes(seed):
    rng = np.random.default_rng(seed)
    gt, dt = [], []
    for i in range(12):
        h, w = int(rng.integers(60, 120)), int(rng.integers(60, 160))
        boxes = []
        for _ in range(int(rng.integers(0, 5))):
            # integer coordinates: exact ties in IoU and score occur; some boxes cross borders
            b = [int(rng.integers(-15, w)), int(rng.integers(-15, h)),
                 int(rng.integers(6, 40)), int(rng.integers(6, 50))]
            r = rng.random()
            boxes.append(mask(*b) if r < 0.15 else person(*b, ignore=int(r > 0.9)))
        gt.append(gt_record(f"im{i}", boxes, height=h, width=w))
        dets = []
        for _ in range(int(rng.integers(0, 6))):
            if boxes and rng.random() < 0.75:
                x, y, bw, bh = boxes[int(rng.integers(len(boxes)))]["fbox"]
                b = [x + int(rng.integers(-3, 4)), y + int(rng.integers(-3, 4)),
                     bw + int(rng.integers(-3, 4)), bh + int(rng.integers(-3, 4))]
            else:
                b = [int(rng.integers(-10, w)), int(rng.integers(-10, h)), 20, 30]
            dets.append(det(*b, float(rng.integers(0, 10)) / 10))
        dt.append({"ID": f"im{i}", "dtboxes": dets})
    if not any(b["tag"] == "person" and not b["extra"]["ignore"]
               for r in gt for b in r["gtboxes"]):
        gt[0]["gtboxes"].append(person(5, 5, 20, 30))
    expected = _slow_reference(gt, dt)
    got = evaluate(gt, dt)
    if expected["recall"] == 0:  # nothing kept matched: only the "no detections" convention
        pytest.skip("degenerate draw")
    for key in ("AP", "MR", "recall", "JI"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
