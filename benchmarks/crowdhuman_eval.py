"""Time ``o2f.evaluation.crowdhuman_evaluate`` at the size of CrowdHuman val.

    python benchmarks/crowdhuman_eval.py [--images 4370] [--dets 100] [--gts 20] [--repeats 1]

Writes synthetic ground truth (about ``--gts`` boxes per image, a tenth of them ignore
regions, no width/height in the records, as in the official file) and ``--dets`` detections
per image (jittered copies of the persons, duplicates, random boxes) as ``.odgt`` files, then
times the whole evaluation from the files: parsing, clipping, matching, AP/MR/recall and the
ten JI thresholds. Target: under 30 s on two cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from o2f.data.crowdhuman import write_odgt
from o2f.evaluation.crowdhuman import crowdhuman_evaluate


def synthetic(
    n_images: int, n_dets: int, n_gts: float, seed: int
) -> tuple[list[dict], list[dict], dict[str, tuple[int, int]]]:
    """(gt records, dt records, {ID: (height, width)}): crowded scenes of pedestrians."""
    rng = np.random.default_rng(seed)
    gt, dt, sizes = [], [], {}
    for i in range(n_images):
        key = f"{i:06d},{rng.integers(16**8):08x}"
        h, w = int(rng.integers(480, 1081)), int(rng.integers(640, 1921))
        sizes[key] = (h, w)
        g = max(int(rng.poisson(n_gts)), 1)
        bh = np.exp(rng.uniform(np.log(30), np.log(0.9 * h), g))
        bw = bh * rng.uniform(0.3, 0.5, g)
        xy = rng.uniform(-0.1, 1.0, (g, 2)) * [w, h]  # some cross the border: clipping
        fbox = np.column_stack([xy, bw, bh])
        tags = np.where(rng.random(g) < 0.1, "mask", "person")
        gt.append({"ID": key, "gtboxes": [
            {"tag": str(t), "fbox": [float(v) for v in b], "extra": {"ignore": 0}}
            for t, b in zip(tags, fbox, strict=True)]})
        # detections: a jittered copy of most boxes, a few duplicates, then random boxes
        src = rng.integers(0, g, n_dets)
        jitter = rng.normal(0, 0.08, (n_dets, 4)) * fbox[src][:, [2, 3, 2, 3]]
        boxes = fbox[src] + jitter
        random = rng.random(n_dets) < 0.5
        rb = np.exp(rng.uniform(np.log(20), np.log(0.8 * h), random.sum()))
        boxes[random] = np.column_stack([rng.uniform(0, w, random.sum()),
                                         rng.uniform(0, h, random.sum()), rb * 0.4, rb])
        scores = np.where(random, rng.uniform(0, 0.6, n_dets), rng.uniform(0.3, 1, n_dets))
        dt.append({"ID": key, "dtboxes": [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "tag": 1}
            for b, s in zip(boxes, scores, strict=True)]})
    return gt, dt, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4370)
    parser.add_argument("--dets", type=int, default=100)
    parser.add_argument("--gts", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, dt, sizes = synthetic(args.images, args.dets, args.gts, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, dt_path = Path(tmp) / "gt.odgt", Path(tmp) / "dt.odgt"
        write_odgt(gt, gt_path)
        write_odgt(dt, dt_path)
        n_gt = sum(len(r["gtboxes"]) for r in gt)
        print(f"{args.images} images, {n_gt} gt boxes, {args.images * args.dets} detections")
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            metrics = crowdhuman_evaluate(gt_path, dt_path, image_sizes=sizes)
            times.append(time.perf_counter() - t0)
    print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"crowdhuman_evaluate: {min(times):.2f} s (best of {args.repeats}; target < 30 s)")


if __name__ == "__main__":
    main()
