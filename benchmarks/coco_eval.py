"""Time ``o2f.evaluation.coco_evaluate`` against plain pycocotools on synthetic COCO data.

    python benchmarks/coco_eval.py [--images 500] [--dets 100] [--gts 7] [--repeats 3]

Both sides start from the same in-memory ground truth and detection list and do the whole
job (load results, match, accumulate, summarise). The twelve numbers must be identical; the
script prints both timings and the speed-up (target: at least 3x).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from o2f.evaluation.coco import STAT_NAMES, coco_evaluate

# COCO's 80 category ids (1..90 with gaps)
CAT_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def synthetic(n_images: int, n_dets: int, n_gts: float, seed: int) -> tuple[dict, list[dict]]:
    """Ground truth with about ``n_gts`` boxes per image (some crowd) and exactly ``n_dets``
    detections per image: noisy copies of the gts (mostly right class) and random boxes."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    for img_id in range(1, n_images + 1):
        w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
        images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "width": w, "height": h})
        gts = []
        for _ in range(int(rng.poisson(n_gts))):
            side = float(np.exp(rng.uniform(np.log(6), np.log(280))))  # small..large
            bw = min(side * rng.uniform(0.5, 1.5), w - 1)
            bh = min(side * rng.uniform(0.5, 1.5), h - 1)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cat = int(rng.choice(CAT_IDS))
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "bbox": [x, y, bw, bh], "area": bw * bh * rng.uniform(0.5, 0.9),
                         "iscrowd": int(rng.random() < 0.02)})
            gts.append((x, y, bw, bh, cat))
        for k in range(n_dets):
            if gts and k < 3 * len(gts):
                x, y, bw, bh, cat = gts[k % len(gts)]
                j = rng.normal(0, 0.1, 4) * np.array([bw, bh, bw, bh])
                box = [x + j[0], y + j[1], max(bw + j[2], 1.0), max(bh + j[3], 1.0)]
                cat = cat if rng.random() < 0.8 else int(rng.choice(CAT_IDS))
                score = float(rng.uniform(0.3, 1.0))
            else:
                bw, bh = rng.uniform(4, 200, 2)
                box = [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh]
                cat, score = int(rng.choice(CAT_IDS)), float(rng.uniform(0.0, 0.6))
            dets.append({"image_id": img_id, "category_id": cat,
                         "bbox": [float(v) for v in box], "score": score})
    cats = [{"id": c, "name": f"class{c}"} for c in CAT_IDS]
    return {"images": images, "annotations": anns, "categories": cats}, dets


def run_pycocotools(gt: dict, dets: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def best_of(repeats: int, fn, *inputs):
    times, out = [], None
    for _ in range(repeats):
        args = copy.deepcopy(inputs)  # both libraries write into the dicts they are given
        t0 = time.perf_counter()
        out = fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--gts", type=float, default=7, help="mean ground-truth boxes per image")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, dets = synthetic(args.images, args.dets, args.gts, args.seed)
    print(f"{len(gt['images'])} images, {len(gt['annotations'])} ground-truth boxes, "
          f"{len(dets)} detections, {len(gt['categories'])} categories")

    t_ref, ref = best_of(args.repeats, run_pycocotools, gt, dets)
    t_ours, ours = best_of(args.repeats, coco_evaluate, gt, dets)

    diff = max(abs(ours[k] - float(v)) for k, v in zip(STAT_NAMES, ref, strict=True))
    for k, v in zip(STAT_NAMES, ref, strict=True):
        print(f"  {k:<6} {ours[k]:.6f}   pycocotools {v:.6f}")
    assert diff <= 1e-12, f"results differ from pycocotools by {diff}"
    speedup = t_ref / t_ours
    print(f"pycocotools COCOeval : {t_ref:7.3f} s")
    print(f"o2f coco_evaluate    : {t_ours:7.3f} s")
    print(f"speed-up             : {speedup:7.1f}x  (target >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'}); max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
