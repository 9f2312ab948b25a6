"""Accuracy of the fast inference paths against float32 eager, on one trained checkpoint.

For each path (eager bf16, onnxruntime float32 / int8, OpenVINO f32 / bf16 / int8) the
val split's AP, and how far its boxes are from float32's: each of float32's top-100
detections per image is matched to the path's same-label detection of highest IoU, and the
largest coordinate difference (pixels) is recorded. Prints a markdown table.

    python benchmarks/precision_accuracy.py --checkpoint runs/demo/last.pt \\
        --calib data/digits/train --paths eager:bf16 onnxruntime:float32 onnxruntime:int8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from o2f.checkpoint import model_from_checkpoint
from o2f.config import load_config
from o2f.data import build_dataset
from o2f.deploy import load_backend
from o2f.engine import predict
from o2f.evaluation import evaluate_detections


def by_image(results: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    """COCO results grouped per image: boxes (K, 4) x1y1x2y2, scores, category ids."""
    out: dict[int, list] = {}
    for r in results:
        out.setdefault(r["image_id"], []).append(r)
    grouped = {}
    for image_id, rs in out.items():
        rs = sorted(rs, key=lambda r: -r["score"])[:100]
        b = torch.tensor([r["bbox"] for r in rs], dtype=torch.float64)
        b[:, 2:] += b[:, :2]
        grouped[image_id] = {"boxes": b, "labels": torch.tensor([r["category_id"] for r in rs])}
    return grouped


def box_errors(reference: list[dict], other: list[dict]) -> np.ndarray:
    """Per float32 top-100 detection: max |coordinate difference| to its best match."""
    ref, oth = by_image(reference), by_image(other)
    errors = []
    for image_id, r in ref.items():
        o = oth.get(image_id)
        for box, label in zip(r["boxes"], r["labels"], strict=True):
            if o is None or not (o["labels"] == label).any():
                errors.append(np.inf)
                continue
            cands = o["boxes"][o["labels"] == label]
            best = box_iou(box[None], cands)[0].argmax()
            errors.append(float((cands[best] - box).abs().max()))
    return np.asarray(errors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", help="config for the val split (default: the checkpoint's)")
    p.add_argument("--set", dest="overrides", nargs="+", default=[])
    p.add_argument("--calib", help="image folder for the int8 paths")
    p.add_argument("--paths", nargs="+", default=["eager:bf16", "onnxruntime:float32"],
                   help="backend:dtype, dtype float32, bf16 or int8")
    p.add_argument("--limit", type=int, default=0, help="first N val images only")
    args = p.parse_args()

    cfg = load_config(args.config, args.overrides) if args.config else None
    model, cfg, _ = model_from_checkpoint(args.checkpoint, cfg)
    if args.config is None and args.overrides:
        cfg = load_config("digits", args.overrides)  # the checkpoint's model, these data
        cfg.model = model.cfg
    # One image per batch on every path: the graphs run one image at a time, and a batch
    # pads its images to a common size, which moves float32's own detections slightly.
    cfg.train.eval_batch_size = 1
    dataset = build_dataset(cfg, "val")
    if args.limit:
        dataset = torch.utils.data.Subset(dataset, range(args.limit))
        dataset.label_to_cat_id = dataset.dataset.label_to_cat_id  # type: ignore[attr-defined]
    cpu = torch.device("cpu")
    rows = []

    def run(name: str, predictor) -> None:
        start = time.perf_counter()
        results = predict(predictor, dataset, cfg, cpu, desc=name)
        seconds = time.perf_counter() - start
        ap = (evaluate_detections(dataset, results)["AP"] if not args.limit
              else float("nan"))
        rows.append((name, ap, results, seconds))

    run("eager float32", load_backend("eager", model, "float32"))
    work = Path(tempfile.mkdtemp(prefix="o2f-acc-"))
    for item in args.paths:
        backend, dtype = item.split(":")
        source: object = model
        if dtype == "int8":
            from o2f.export import export_onnx

            graph = export_onnx(model, work / "float32.onnx", size=(256, 320), dynamic=True)
            if backend == "onnxruntime":
                from o2f.deploy.onnxruntime import quantize_int8
            else:
                from o2f.deploy.openvino import quantize_int8
            source = quantize_int8(graph, work / f"{backend}_int8.onnx", args.calib)
            dtype = "float32"
        run(item, load_backend(backend, source, dtype))

    reference = rows[0][2]
    print("| path | AP | dAP | boxes within 1 px of float32 | p99 box error (px) | s |")
    print("|---|---|---|---|---|---|")
    for name, ap, results, seconds in rows:
        err = box_errors(reference, results)
        print(f"| {name} | {ap:.4f} | {ap - rows[0][1]:+.4f} | {np.mean(err <= 1):.2%} | "
              f"{np.percentile(err, 99):.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
