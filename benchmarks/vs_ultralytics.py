"""o2f's ``digits`` preset against Ultralytics' NMS-free YOLO26n and YOLOv10n, at equal CPU
training time, on the crowd and the sparse digits (needs the ``peers`` extra).

    python benchmarks/vs_ultralytics.py --out runs/vs_ultralytics [--variants crowd sparse]
        [--models yolo26n yolov10n] [--threads 2] [--num-train N --num-val N --epochs E]

Per digit variant: trains the ``digits`` preset (10 classes) and takes its wall-clock
training time as the budget; converts the same train / val split to YOLO format and trains
each Ultralytics model from its yaml (from scratch: nothing is downloaded; plots, AMP
checks, validation during training and every online call off) with ``time`` set to that
budget, at its own default recipe (augmentation, optimiser, schedule). Every model is then
evaluated with o2f's ``coco_evaluate`` on the same val split (all scores >= 0.001, at most
100 detections per image), twice:

- end to end: o2f without NMS; theirs through the one-to-one head (``predict(nms=False)``;
  their default ``nms=None`` runs the one-to-many head with NMS);
- with NMS: o2f with ``model.nms=true``; theirs at their default.

Prints and writes (``results.md``, ``results.json``) AP, AP50, AP75, AR100, AP gained by
NMS, duplicates per image (detections scoring >= 0.3 that repeat a better one on the same
object), parameters and CPU latency per image (one image at a time, pre- and
post-processing included, median over the first 30 val images). Parameters are those of
the end-to-end model (Ultralytics' one-to-many head, unused at inference, is left out).
``--num-train``, ``--num-val`` and ``--epochs`` make a small smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from o2f.checkpoint import model_from_checkpoint
from o2f.config import SplitConfig, load_config
from o2f.data import build_dataset
from o2f.data.digits import make_digits
from o2f.engine import predict, train
from o2f.evaluation import coco_evaluate
from o2f.evaluation.duplicates import duplicate_rate

KEYS = ("AP", "AP50", "AP75", "AR100")
SCORE, MAX_DETS, LATENCY_IMAGES = 0.001, 100, 30


def import_ultralytics():
    """Ultralytics with every online call and logger integration switched off."""
    os.environ["YOLO_OFFLINE"] = "1"
    try:
        import ultralytics
        from ultralytics import settings
    except ImportError as e:
        raise SystemExit("this benchmark needs the peers extra: pip install 'o2f[peers]'") from e
    settings.update({"sync": False, "clearml": False, "comet": False, "dvc": False,
                     "mlflow": False, "raytune": False, "tensorboard": False, "wandb": False})
    return ultralytics


def to_yolo(coco_json: Path, img_dir: Path, out: Path, split: str) -> list[int]:
    """Write ``out/images/split`` (links to the images) and ``out/labels/split`` (one
    ``class cx cy w h`` line per box, normalised) from a COCO split. Returns the category
    ids in class-index order."""
    data = json.loads(coco_json.read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    index = {c: i for i, c in enumerate(cat_ids)}
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / split).mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {img["id"]: [] for img in data["images"]}
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        iw, ih = sizes[ann["image_id"]]
        lines[ann["image_id"]].append(f"{index[ann['category_id']]} {(x + w / 2) / iw:.6f} "
                                      f"{(y + h / 2) / ih:.6f} {w / iw:.6f} {h / ih:.6f}")
    for img in data["images"]:
        src = (img_dir / img["file_name"]).resolve()
        link = out / "images" / split / Path(img["file_name"]).name
        if not link.exists():
            link.symlink_to(src)
        (out / "labels" / split / f"{link.stem}.txt").write_text("\n".join(lines[img["id"]]))
    return cat_ids


def evaluate(name: str, val_set, detect_e2e, detect_nms, latency: float, params: int,
             train_seconds: float) -> dict:
    """One row: the metrics of both evaluations of a model."""
    row = {"model": name, "train_seconds": train_seconds, "params": params,
           "latency_ms": latency * 1e3}
    for tag, fn in (("e2e", detect_e2e), ("nms", detect_nms)):
        results = fn()
        metrics = coco_evaluate(val_set.coco, results)
        row[tag] = {**{k: metrics[k] for k in KEYS},
                    "duplicates_per_image": duplicate_rate(val_set.coco, results)}
    row["AP_gained_by_nms"] = row["nms"]["AP"] - row["e2e"]["AP"]
    return row


def median_latency(fn, items: list) -> float:
    fn(items[0])  # warm-up
    times = []
    for item in items[:LATENCY_IMAGES]:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_o2f(cfg, work: Path, val_set) -> dict:
    seconds = work / "train_seconds.json"
    if not (work / "last.pt").exists() or not seconds.exists():
        start = time.perf_counter()
        train(cfg, work)
        seconds.write_text(json.dumps(time.perf_counter() - start))
    model, _, _ = model_from_checkpoint(work / "last.pt")
    model.eval()
    model.cfg.score_thresh, model.cfg.topk = SCORE, MAX_DETS

    def detections(nms: bool):
        model.cfg.nms = nms
        with torch.inference_mode():
            return predict(model, val_set, cfg, torch.device("cpu"), desc=f"o2f nms={nms}")

    images = [val_set[i][0] for i in range(min(len(val_set), LATENCY_IMAGES + 1))]
    model.cfg.nms = False
    with torch.inference_mode():
        latency = median_latency(lambda img: model([img]), images)
    return evaluate("o2f digits", val_set, lambda: detections(False), lambda: detections(True),
                    latency, sum(p.numel() for n, p in model.named_parameters()
                                 if ".one_to_many." not in n),
                    json.loads(seconds.read_text()))


def run_ultralytics(name: str, data_yaml: Path, work: Path, budget: float, val_set,
                    cat_ids: list[int], epochs: int | None, imgsz: int, threads: int) -> dict:
    from ultralytics import YOLO

    weights = work / name / "weights" / "last.pt"
    seconds = work / name / "train_seconds.json"
    if not weights.exists() or not seconds.exists():
        model = YOLO(f"{name}.yaml")
        start = time.perf_counter()
        schedule = {"epochs": epochs} if epochs else {"epochs": 1000, "time": budget / 3600}
        model.train(data=str(data_yaml), imgsz=imgsz, batch=8, device="cpu", workers=0,
                    plots=False, amp=False, val=False, pretrained=False, seed=0,
                    # absolute: Ultralytics puts a relative project under its runs/detect
                    project=str(work.resolve()), name=name, exist_ok=True, verbose=False,
                    **schedule)
        seconds.write_text(json.dumps(time.perf_counter() - start))
    model = YOLO(str(weights))
    paths = {img["id"]: str(Path(val_set.img_dir) / img["file_name"])
             for img in val_set.coco.dataset["images"]}

    def detections(nms: bool | None):
        results = []
        for image_id, path in paths.items():
            (res,) = model.predict(path, conf=SCORE, max_det=MAX_DETS, nms=nms, imgsz=imgsz,
                                   device="cpu", verbose=False)
            boxes = res.boxes
            for (x1, y1, x2, y2), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(),
                                                    boxes.cls.int().tolist(), strict=True):
                results.append({"image_id": image_id, "category_id": cat_ids[cls],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
        return results

    latency = median_latency(
        lambda p: model.predict(p, conf=SCORE, max_det=MAX_DETS, nms=False, imgsz=imgsz,
                                device="cpu", verbose=False), list(paths.values()))
    # parameters of the end-to-end model: without the one-to-many head it drops at inference
    head = model.model.model[-1]
    unused = (sum(p.numel() for n in ("cv2", "cv3") for p in getattr(head, n).parameters())
              if getattr(head, "one2one_cv2", None) is not None else 0)
    params = sum(p.numel() for p in model.model.parameters()) - unused
    return evaluate(name, val_set, lambda: detections(False), lambda: detections(None),
                    latency, params, json.loads(seconds.read_text()))


def table(rows: list[dict]) -> list[str]:
    lines = ["| variant | model | train s | params | AP | AP50 | AP75 | AR100 | dup / img | "
             "AP + NMS | AP gained by NMS | dup / img + NMS | CPU ms / img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, n = r["e2e"], r["nms"]
        lines.append(f"| {r['variant']} | {r['model']} | {r['train_seconds']:.0f} | "
                     f"{r['params'] / 1e6:.2f}M | {e['AP']:.3f} | {e['AP50']:.3f} | "
                     f"{e['AP75']:.3f} | {e['AR100']:.3f} | {e['duplicates_per_image']:.2f} | "
                     f"{n['AP']:.3f} | {r['AP_gained_by_nms']:+.3f} | "
                     f"{n['duplicates_per_image']:.2f} | {r['latency_ms']:.1f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vs_ultralytics")
    parser.add_argument("--variants", nargs="+", default=["crowd", "sparse"],
                        choices=["crowd", "sparse"])
    parser.add_argument("--models", nargs="+", default=["yolo26n", "yolov10n"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for everything")
    parser.add_argument("--imgsz", type=int, default=384, help="their input size (the "
                        "canvases are 256-384 px; o2f reads them at native size)")
    parser.add_argument("--num-train", type=int, default=None, help="smoke runs: images")
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None,
                        help="smoke runs: epochs of every model instead of the time budget")
    args = parser.parse_args()
    import_ultralytics()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    for variant in args.variants:
        small = args.num_train is not None or args.num_val is not None
        data = out / f"data_{variant}" if small else Path(f"data/digits_{variant}_10class")
        if not (data / "annotations" / "val.json").exists():
            make_digits(data, variant=variant, seed=0, num_train=args.num_train,
                        num_val=args.num_val)
        # the release's recipe (the rescorer off), as docs/benchmarks.md measured it
        cfg = load_config("digits", ["model.num_classes=10", "train.eval_every=0",
                                     "model.rescore=false"])
        if args.epochs:
            cfg.train.epochs = args.epochs
        cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
        cfg.data.val = SplitConfig(str(data / "annotations/val.json"), str(data / "val"))
        val_set = build_dataset(cfg, "val")
        work = out / variant
        ours = run_o2f(cfg, work / "o2f", val_set)
        rows.append({"variant": variant, **ours})
        yolo = out / f"yolo_{variant}"
        cat_ids = to_yolo(data / "annotations/train.json", data / "train", yolo, "train")
        to_yolo(data / "annotations/val.json", data / "val", yolo, "val")
        names = {c["id"]: c["name"] for c in val_set.coco.dataset["categories"]}
        data_yaml = yolo / "data.yaml"
        data_yaml.write_text(json.dumps({"path": str(yolo.resolve()), "train": "images/train",
                                         "val": "images/val",
                                         "names": {i: names[c] for i, c in enumerate(cat_ids)}}))
        for name in args.models:
            rows.append({"variant": variant, **run_ultralytics(
                name, data_yaml, work, ours["train_seconds"], val_set, cat_ids, args.epochs,
                args.imgsz, args.threads)})
        print("\n".join(table(rows)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(table(rows)) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
