"""Large images: o2f's tiles merged by centre ownership vs the same tiles merged with NMS vs
SAHI's sliced prediction (NMS and NMM merging) vs one pass, on large canvases of the crowd
digits.

    python benchmarks/tiling.py --checkpoint CKPT --data DIR [--canvas 2048] [--tile 512]
        [--overlap 128] [--images 4] [--out runs/tiling]

``--data`` is a crowd-digits folder (``o2f data digits --variant crowd --single-class``);
``CKPT`` a model trained on it at the digits preset's native size. Each large canvas is a
mosaic of the val images, pasted at their own size (256-384 px) row by row on a grey
ground, so the objects keep the scale the model was trained at and many of them are cut
by tile edges. Every method uses the same model, the same tiles (side ``--tile``, least
overlap ``--overlap``; SAHI's own slicing with the same side and overlap ratio, which lays
the same windows here) and the model's own score threshold. Scored with COCO AP / AP50 at
up to 3,000 detections per image (a canvas holds ~500 objects, past COCO's 100), the
duplicate rate (``o2f.evaluation.duplicates.duplicate_rate``: detections scoring >= 0.3 that
repeat a higher-scored one on the same object at IoU >= 0.5), and the wall time per image.

SAHI (the ``peers`` extra) runs our model through its ``DetectionModel`` interface, batched
like ours, with ``perform_standard_pred=False`` (no extra full-image pass) and its merge
forced to the type asked for. It loads nothing from the network.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from PIL import Image
from torchvision.ops import batched_nms

from o2f.checkpoint import model_from_checkpoint
from o2f.evaluation.duplicates import duplicate_rate
from o2f.tiling import default_overlap, predict_tiled, tile_grid

MAX_DETS = 3000


def build_canvases(data: Path, side: int, count: int, seed: int = 0) -> tuple[list, dict]:
    """``count`` uint8 3 x side x side canvases tiled row by row with the val images (in a
    seeded random order, each used at most once) and their COCO ground truth."""
    gt = json.loads((data / "annotations/val.json").read_text())
    anns: dict[int, list] = {}
    for a in gt["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    order = np.random.default_rng(seed).permutation(len(gt["images"]))
    pool = [gt["images"][i] for i in order]
    canvases, images, annotations = [], [], []
    for c in range(count):
        canvas = np.full((side, side, 3), 118, np.uint8)
        x = y = row_h = 0
        while pool:
            info = pool[0]
            w, h = info["width"], info["height"]
            if x + w > side:
                x, y, row_h = 0, y + row_h, 0
            if y + h > side:
                break
            pool.pop(0)
            canvas[y:y + h, x:x + w] = np.asarray(
                Image.open(data / "val" / info["file_name"]).convert("RGB"))
            for a in anns.get(info["id"], []):
                bx, by, bw, bh = a["bbox"]
                annotations.append({"id": len(annotations) + 1, "image_id": c + 1,
                                    "category_id": a["category_id"],
                                    "bbox": [bx + x, by + y, bw, bh], "area": a["area"],
                                    "iscrowd": 0})
            x, row_h = x + w, max(row_h, h)
        canvases.append(torch.from_numpy(canvas).permute(2, 0, 1).contiguous())
        images.append({"id": c + 1, "file_name": f"canvas_{c}.png", "width": side,
                       "height": side})
    return canvases, {"images": images, "annotations": annotations,
                      "categories": gt["categories"]}


def coco_ap(gt: dict, results: list[dict]) -> dict[str, float]:
    """AP and AP50 with up to ``MAX_DETS`` detections per image."""
    if not results:
        return {"AP": 0.0, "AP50": 0.0}
    coco_gt = COCO(gt, print_function=lambda *a, **k: None)
    evaluator = COCOeval_faster(coco_gt, coco_gt.loadRes([dict(r) for r in results]), "bbox",
                                print_function=lambda *a, **k: None, separate_eval=True)
    evaluator.params.maxDets = [10, 100, MAX_DETS]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1])}


def to_results(image_id: int, det: dict, cat_ids: list[int]) -> list[dict]:
    boxes = det["boxes"].float().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": cat_ids[int(c)],
             "bbox": [round(v, 2) for v in b], "score": round(float(s), 5)}
            for b, s, c in zip(boxes.tolist(), det["scores"].tolist(), det["labels"].tolist(),
                               strict=True)]


def tiles_with_nms(model, image: torch.Tensor, tile: int, overlap: int, iou: float,
                   batch_size: int) -> dict:
    """The same tiles as o2f's, every tile's detections kept, then class-wise NMS."""
    grid = tile_grid(image.shape[-2], image.shape[-1], tile, overlap)
    shifts = grid.windows[:, :2].repeat(1, 2).float()
    parts = []
    for start in range(0, len(grid), batch_size):
        ks = list(range(start, min(start + batch_size, len(grid))))
        for k, det in zip(ks, model([grid.crop(image, k) for k in ks]), strict=True):
            parts.append({**det, "boxes": det["boxes"] + shifts[k]})
    boxes = torch.cat([p["boxes"] for p in parts])
    scores = torch.cat([p["scores"] for p in parts])
    labels = torch.cat([p["labels"] for p in parts])
    keep = batched_nms(boxes, scores, labels, iou)
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def sahi_model(model, num_classes: int, score_thresh: float):
    """Our model as a SAHI ``DetectionModel`` (batched slices)."""
    from sahi.models.base import DetectionModel
    from sahi.prediction import ObjectPrediction
    from sahi.utils.compatibility import fix_full_shape_list, fix_shift_amount_list

    class O2FSahi(DetectionModel):
        def load_model(self) -> None:
            raise RuntimeError("pass the model in: it is built from an o2f checkpoint")

        def set_model(self, model, **kwargs) -> None:
            self.model = model
            self.category_mapping = {str(i): str(i) for i in range(num_classes)}

        def perform_inference(self, image: np.ndarray) -> None:
            self.perform_batch_inference([image])

        def perform_batch_inference(self, images: list[np.ndarray]) -> None:
            batch = [torch.from_numpy(np.ascontiguousarray(i)).permute(2, 0, 1).float() / 255
                     for i in images]
            self._original_predictions = self.model(batch)

        def _create_object_prediction_list_from_original_predictions(
                self, shift_amount_list=None, full_shape_list=None) -> None:
            shifts = fix_shift_amount_list(shift_amount_list or [[0, 0]])
            shapes = fix_full_shape_list(full_shape_list)
            per_image = []
            for i, det in enumerate(self._original_predictions):
                keep = det["scores"] > self.confidence_threshold
                per_image.append([
                    ObjectPrediction(bbox=b, category_id=int(c), category_name=str(int(c)),
                                     score=float(s), shift_amount=shifts[i],
                                     full_shape=shapes[i] if shapes else None)
                    for b, s, c in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(),
                                       det["labels"][keep].tolist(), strict=True)])
            self._object_prediction_list_per_image = per_image

    return O2FSahi(model=model, confidence_threshold=score_thresh, device="cpu")


def sahi_predict(detection_model, image: torch.Tensor, tile: int, overlap: int, merge: str,
                 metric: str, batch_size: int) -> dict:
    from sahi.predict import get_sliced_prediction

    pixels = (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # SAHI's input
    result = get_sliced_prediction(
        pixels, detection_model, slice_height=tile, slice_width=tile,
        overlap_height_ratio=overlap / tile, overlap_width_ratio=overlap / tile,
        perform_standard_pred=False, postprocess_type=merge, postprocess_match_metric=metric,
        postprocess_match_threshold=0.5, verbose=0, batch_size=batch_size,
        force_postprocess_type=True)
    preds = result.object_prediction_list
    return {"boxes": torch.tensor([p.bbox.to_xyxy() for p in preds]).reshape(-1, 4),
            "scores": torch.tensor([p.score.value for p in preds]),
            "labels": torch.tensor([p.category.id for p in preds], dtype=torch.int64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="crowd digits folder (single class)")
    parser.add_argument("--canvas", type=int, default=2048)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-sahi", action="store_true")
    parser.add_argument("--out", default="runs/tiling")
    parser.add_argument("--picture", help="also draw the o2f tiled prediction of the top-left "
                                          "1024 x 1024 of the first canvas into this file")
    args = parser.parse_args()
    overlap = default_overlap(args.tile) if args.overlap is None else args.overlap
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model, cfg, _ = model_from_checkpoint(args.checkpoint)
    model.fuse_batchnorm()
    canvases, gt = build_canvases(Path(args.data), args.canvas, args.images)
    cat_ids = [c["id"] for c in gt["categories"]]
    print(f"{len(canvases)} canvases of {args.canvas}x{args.canvas}, "
          f"{len(gt['annotations'])} objects; tile {args.tile}, overlap {overlap} "
          f"({len(tile_grid(args.canvas, args.canvas, args.tile, overlap))} tiles per canvas)")

    def net(images):
        with torch.inference_mode():
            return model(images)

    def one_pass(image):
        # a canvas holds hundreds of objects: lift the per-image caps for this pass only
        topk, pre = model.cfg.topk, model.cfg.pre_topk
        model.cfg.topk, model.cfg.pre_topk = MAX_DETS, 4 * MAX_DETS
        try:
            return net([image])[0]
        finally:
            model.cfg.topk, model.cfg.pre_topk = topk, pre

    methods = {
        "o2f tiles, centre ownership (no NMS)": lambda img: predict_tiled(
            net, img, tile=args.tile, overlap=overlap, batch_size=args.batch_size),
        "same tiles + NMS 0.5": lambda img: tiles_with_nms(
            net, img, args.tile, overlap, 0.5, args.batch_size),
        "same tiles + NMS 0.7": lambda img: tiles_with_nms(
            net, img, args.tile, overlap, 0.7, args.batch_size),
    }
    if not args.no_sahi:
        sahi = sahi_model(net, cfg.model.num_classes, cfg.model.score_thresh)
        methods["SAHI sliced, NMS (IoU 0.5)"] = lambda img: sahi_predict(
            sahi, img, args.tile, overlap, "NMS", "IOU", args.batch_size)
        methods["SAHI sliced, GREEDYNMM (IoS 0.5, its default)"] = lambda img: sahi_predict(
            sahi, img, args.tile, overlap, "GREEDYNMM", "IOS", args.batch_size)
    methods["one pass, whole canvas"] = one_pass

    rows = []
    for name, run in methods.items():
        results, seconds = [], 0.0
        for i, canvas in enumerate(canvases):
            image = canvas.float() / 255
            start = time.perf_counter()
            det = run(image)
            seconds += time.perf_counter() - start
            results += to_results(i + 1, det, cat_ids)
        row = {"method": name, **coco_ap(gt, results),
               "duplicates_per_image": duplicate_rate(gt, results),
               "seconds_per_image": seconds / len(canvases),
               "detections_per_image": len(results) / len(canvases)}
        rows.append(row)
        print(json.dumps(row))
    (out / "results.json").write_text(json.dumps({"args": vars(args), "overlap": overlap,
                                                  "objects": len(gt["annotations"]),
                                                  "rows": rows}, indent=1) + "\n")
    table = ["| method | AP | AP50 | duplicates / image | s / image | detections / image |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['method']} | {100 * r['AP']:.1f} | {100 * r['AP50']:.1f} | "
              f"{r['duplicates_per_image']:.1f} | {r['seconds_per_image']:.2f} | "
              f"{r['detections_per_image']:.0f} |" for r in rows]
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    if args.picture:
        picture(canvases[0], predict_tiled(net, canvases[0].float() / 255, tile=args.tile,
                                           overlap=overlap, batch_size=args.batch_size),
                tile_grid(args.canvas, args.canvas, args.tile, overlap), args.picture)


def picture(canvas: torch.Tensor, det: dict, grid, path: str, crop: int = 1024) -> None:
    """The detections scoring >= 0.3 on the canvas (red), the tile windows (thin grey) and
    the boundaries of the owned regions (dashed yellow), cropped to ``crop`` pixels a side."""
    from PIL import ImageDraw

    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    pen = ImageDraw.Draw(img)
    side = canvas.shape[-1]
    for x1, y1, x2, y2 in grid.windows.tolist():
        pen.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(150, 150, 150), width=1)
    for cut in grid.x_cuts.tolist():
        for y in range(0, side, 16):
            pen.line([(cut, y), (cut, y + 8)], fill=(255, 215, 0), width=3)
    for cut in grid.y_cuts.tolist():
        for x in range(0, side, 16):
            pen.line([(x, cut), (x + 8, cut)], fill=(255, 215, 0), width=3)
    for box in det["boxes"][det["scores"] >= 0.3].tolist():
        pen.rectangle(box, outline=(230, 25, 75), width=2)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.crop((0, 0, crop, crop)).save(path, quality=88)


if __name__ == "__main__":
    main()
