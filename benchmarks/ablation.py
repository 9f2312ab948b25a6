"""The paper's ablation on the built-in crowd of digits: one-to-few vs one-to-one vs the
other end-to-end rules (DeFCN's POTO, YOLOv10's dual assignment) vs one-to-many (+/- NMS),
under one training budget.

    python benchmarks/ablation.py --out runs/ablation [--budget 1.0] [--classes 1]
        [--variant crowd|sparse] [--modes o2f o2o poto poto_aux dual o2m] [--set K=V ...]

Trains the ``digits`` preset once per mode on the crowd variant (same data, seed,
iterations and network; only the assignment differs) and evaluates o2f, o2o, poto,
poto + aux and dual without NMS, o2m with NMS (IoU 0.6) and o2m without NMS. Writes
``results.json``, ``results.md`` (a Markdown table), ``ap.png`` (a bar chart) and
side-by-side pictures of crowded val images (o2f without NMS | o2m with NMS) to
``--out``. Every variant without NMS is also evaluated with it (class-wise NMS at
``model.nms_iou``), for "AP gained by NMS": what NMS still adds to a detector that is
meant not to need it.

The duplicate rate counts, per image, detections scoring at least 0.3 that overlap
(IoU >= 0.5, same class) a higher-scored detection matched to the same ground truth. Every
variant without NMS is also scored with exactly those duplicates left out
(``without_duplicates``, which reads the ground truth): the AP an ideal duplicate removal
would leave the same model, the bound for any recipe that only removes duplicates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_convert, box_iou

from o2f.checkpoint import model_from_checkpoint
from o2f.config import SplitConfig, load_config
from o2f.data import build_dataset
from o2f.data.digits import make_digits
from o2f.engine import predict, train
from o2f.evaluation import coco_evaluate
from o2f.evaluation.duplicates import duplicate_pairs, duplicate_rate, without_duplicates
from o2f.model.head import decode

# Each mode trains one model: model.assign and what else sets it apart.
MODES = {"o2f": ["model.assign=o2f"], "o2o": ["model.assign=o2o"],
         "poto": ["model.assign=poto"], "poto_aux": ["model.assign=poto", "model.poto_aux=true"],
         "dual": ["model.assign=dual"], "o2m": ["model.assign=o2m"]}
# (row, mode, NMS): every row without NMS is also evaluated with it (the "+ NMS" columns).
VARIANTS = [("o2f", "o2f", False), ("o2o", "o2o", False), ("poto", "poto", False),
            ("poto + aux", "poto_aux", False), ("dual", "dual", False),
            ("o2m + NMS", "o2m", True), ("o2m, no NMS", "o2m", False)]


def peak_and_best_iou(scores: torch.Tensor, boxes: torch.Tensor, gt_boxes: torch.Tensor,
                      gt_labels: torch.Tensor, iou: float = 0.5) -> list[tuple[float, float]]:
    """Per object with a dense box at IoU >= ``iou``: the IoU of its peak (the best-scored of
    those boxes, scored at the object's class) and the best IoU among them. scores (N, C),
    boxes (N, 4) all dense predictions of an image; gt_boxes (G, 4), gt_labels (G,)."""
    overlap = box_iou(boxes, gt_boxes)  # (N, G)
    near = overlap >= iou
    peak = torch.where(near, scores[:, gt_labels], -1.0).argmax(0)  # (G,)
    peak_iou = overlap.gather(0, peak[None])[0]
    best_iou = torch.where(near, overlap, 0.0).max(0).values
    found = near.any(0)
    return list(zip(peak_iou[found].tolist(), best_iou[found].tolist(), strict=True))


@torch.inference_mode()
def diagnose(model, dataset, *, score: float = 0.3, iou: float = 0.5) -> tuple[dict, dict]:
    """Two readings of a trained model's dense outputs on ``dataset`` (one image per batch),
    both against its own assignment at the end of the schedule (t = ``t_end``).

    anatomy: where its duplicates come from. For each duplicate (``duplicate_pairs``) the
    FPN level and cell of its point against those of the better detection it repeats; its
    role for the object it repeats: a soft anchor (o2f's positives labelled below 1), another
    positive (o2f's certain positive; any positive of the other rules), or neither; and its
    score.
    soft anchors: how far the model follows its last soft labels, the scores p at the
    certain positives and at the soft anchors (with the soft anchors' targets); and, per
    object, the box of its peak (the best-scored of all dense boxes at IoU >= 0.5 with it)
    against the best of those boxes: the share of objects whose peak, and whose best box,
    reaches IoU 0.75, and how often the peak is the best box.
    """
    model.eval()
    counts = {"same_level_adjacent": 0, "same_level_farther": 0, "other_level": 0,
              "soft_anchor": 0, "positive": 0, "total": 0}
    dup_scores, best_scores, certain, soft, soft_target = [], [], [], [], []
    peak_iou, best_iou = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        batch, sizes, _, targets = model.preprocess([image], [target])
        out = model.forward_dense(batch)
        roles = model.assign(out, targets, model.cfg.t_end)[0]

        p = torch.sigmoid(out.cls_logits[0]) * torch.sigmoid(out.obj_logits[0])[:, None]
        pos = torch.nonzero(roles.positive).squeeze(1)
        # o2f's soft anchors are its positives other than the certain ones
        is_soft = (roles.positive & ~roles.certain if roles.certain is not None
                   else torch.zeros_like(roles.positive))
        p_pos, is_certain = p[pos, roles.labels[pos]], ~is_soft[pos]
        certain += p_pos[is_certain].tolist()
        soft += p_pos[~is_certain].tolist()
        soft_target += roles.soft_labels[pos][~is_certain].tolist()

        boxes, scores, labels, points = (x[0] for x in model.postprocess(
            out, sizes, return_index=True))
        gt_boxes = targets[0]["boxes"].reshape(-1, 4)  # in the batch's pixels, as the boxes
        for peak, best in peak_and_best_iou(p, decode(out.points, out.box_ltrb[0].float()),
                                            gt_boxes, targets[0]["labels"]):
            peak_iou.append(peak)
            best_iou.append(best)
        starts = torch.tensor([0] + out.level_sizes).cumsum(0)
        for i, j, g in duplicate_pairs(boxes, scores, labels, gt_boxes, target["labels"],
                                       score=score, iou=iou):
            pi, pj = int(points[i]), int(points[j])
            li, lj = (int(torch.searchsorted(starts, q, right=True)) - 1 for q in (pi, pj))
            counts["total"] += 1
            if li != lj:
                counts["other_level"] += 1
            else:
                width = out.level_shapes[li][1]
                yi, xi = divmod(pi - int(starts[li]), width)
                yj, xj = divmod(pj - int(starts[li]), width)
                near = max(abs(yi - yj), abs(xi - xj)) <= 1
                counts["same_level_adjacent" if near else "same_level_farther"] += 1
            if int(roles.gt_index[pi]) == g:
                counts["soft_anchor" if bool(is_soft[pi]) else "positive"] += 1
            dup_scores.append(float(scores[i]))
            best_scores.append(float(scores[j]))

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else 0.0

    total = max(counts["total"], 1)
    anatomy = {**{k: v / total if k != "total" else v for k, v in counts.items()},
               "median_score": median(dup_scores),
               "median_score_of_repeated": median(best_scores)}
    soft_anchors = {"t_end": model.cfg.t_end, "median_certain": median(certain),
                    "median_soft": median(soft), "median_soft_target": median(soft_target),
                    "soft_at_or_above_score": float((np.asarray(soft) >= score).mean())
                    if soft else 0.0,
                    "soft_per_image": len(soft) / max(len(dataset), 1),
                    "peak_iou_75": float((np.asarray(peak_iou) >= 0.75).mean())
                    if peak_iou else 0.0,
                    "best_iou_75": float((np.asarray(best_iou) >= 0.75).mean())
                    if best_iou else 0.0,
                    "peak_is_best": float((np.asarray(peak_iou) == np.asarray(best_iou)).mean())
                    if peak_iou else 0.0}
    return anatomy, soft_anchors


def side_by_side(out_dir: Path, val_set, runs: dict[str, list[dict]], count: int = 4) -> None:
    """Crowded val images: o2f without NMS (left) and o2m with NMS (right)."""
    from PIL import Image

    from o2f.predict import draw

    coco = val_set.coco
    ids = sorted(coco.getImgIds(), key=lambda i: -len(coco.imgToAnns[i]))[:count]
    for image_id in ids:
        index = val_set.image_ids.index(image_id)
        image, _ = val_set[index]
        image = (image * 255).to(torch.uint8)
        panels = []
        for name in ("o2f", "o2m + NMS"):
            dets = [r for r in runs[name] if r["image_id"] == image_id and r["score"] >= 0.3]
            boxes = box_convert(torch.tensor([d["bbox"] for d in dets]).reshape(-1, 4),
                                "xywh", "xyxy")
            labels = [0] * len(dets)
            picture = draw(image, boxes, labels, [d["score"] for d in dets], [""])
            panels.append(picture.permute(1, 2, 0).numpy())
        gap = np.full((panels[0].shape[0], 8, 3), 255, np.uint8)
        Image.fromarray(np.concatenate([panels[0], gap, panels[1]], 1)).save(
            out_dir / f"crowd_{image_id}_o2f_vs_o2m_nms.png")


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["AP", "AP50", "AP75", "AR100"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        ax.bar(np.arange(len(keys)) + i * width, [row[k] for k in keys], width,
               label=row["variant"])
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.set_ylim(0, 1)
    ax.set_title("crowd digits, val")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--data", default=None,
                        help="dataset folder prefix (default data/digits_<variant>)")
    parser.add_argument("--variant", choices=["crowd", "sparse"], default="crowd")
    parser.add_argument("--classes", type=int, choices=[1, 10], default=1,
                        help="1: every digit is 'digit' (default); 10: the digit classes")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplies the digits preset's epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="assignments to train (poto_aux: poto with its auxiliary loss)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for every mode (a variation of the recipe; "
                             "give it its own --out)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(f"{args.data or 'data/digits_' + args.variant}_{args.classes}class")
    if not (data / "annotations" / "val.json").exists():
        make_digits(data, variant=args.variant, seed=args.seed, single_class=args.classes == 1)
    runs: dict[str, list[dict]] = {}
    rows = []
    timings = {}
    for mode in args.modes:
        # the bare assignments (the digits preset's rescorer off), as every table measures
        cfg = load_config("digits", ["model.rescore=false", *MODES[mode],
                                     f"model.num_classes={args.classes}",
                                     f"train.seed={args.seed}", *args.set])
        cfg.train.epochs = max(1, round(cfg.train.epochs * args.budget))
        cfg.train.eval_every = 0
        cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
        cfg.data.val = SplitConfig(str(data / "annotations/val.json"), str(data / "val"))
        work = out / f"{mode}_x{args.budget:g}"
        seconds = work / "train_seconds.json"  # kept so that a re-evaluation reports it
        if not (work / "last.pt").exists() or load_checkpoint_epochs(work) < cfg.train.epochs:
            start = time.perf_counter()
            train(cfg, work, resume=(work / "last.pt").exists())
            seconds.write_text(json.dumps(time.perf_counter() - start))
        timings[mode] = json.loads(seconds.read_text()) if seconds.exists() else None
        val_set = build_dataset(cfg, "val")
        for name, m, nms in VARIANTS:
            if m != mode:
                continue
            model, _, _ = model_from_checkpoint(work / "last.pt")
            model.cfg.nms = nms
            with torch.inference_mode():
                results = predict(model, val_set, cfg, torch.device("cpu"), desc=name)
            runs[name] = results
            metrics = coco_evaluate(val_set.coco, results)
            rows.append({"variant": name, **{k: metrics[k] for k in
                                             ("AP", "AP50", "AP75", "AR100")},
                         "duplicates_per_image": duplicate_rate(val_set.coco, results)})
            if not nms:  # the same model with NMS added: what NMS still buys it
                model.cfg.nms = True
                with torch.inference_mode():
                    with_nms = predict(model, val_set, cfg, torch.device("cpu"),
                                       desc=f"{name} + NMS")
                model.cfg.nms = False
                m_nms = coco_evaluate(val_set.coco, with_nms)
                rows[-1]["with_nms"] = {
                    **{k: m_nms[k] for k in ("AP", "AP50", "AP75", "AR100")},
                    "duplicates_per_image": duplicate_rate(val_set.coco, with_nms)}
                rows[-1]["AP_gained_by_nms"] = m_nms["AP"] - metrics["AP"]
                # what an ideal duplicate removal (it knows the ground truth) would leave
                m_dedup = coco_evaluate(val_set.coco, without_duplicates(val_set.coco, results))
                rows[-1]["without_duplicates"] = {k: m_dedup[k] for k in ("AP", "AP50", "AP75")}
                # ... and with every duplicate left out, whatever its score: one box per
                # object, without the low-scored second boxes that still count at high IoU
                m_one = coco_evaluate(val_set.coco, without_duplicates(val_set.coco, results,
                                                                       score=0.0))
                rows[-1]["one_box_per_object"] = {k: m_one[k] for k in ("AP", "AP50", "AP75")}
            rows[-1]["anatomy"], soft_anchors = diagnose(model, val_set)
            if m in ("o2f", "o2o") and not nms:
                rows[-1]["soft_anchors"] = soft_anchors
            print(rows[-1])
    if {"o2f", "o2m + NMS"} <= set(runs):
        side_by_side(out, val_set, runs)
    rows, timings = merged_with_earlier(out / "results.json", args, rows, timings)
    bar_chart(rows, out / "ap.png")
    table = ["| variant | AP | AP50 | AP75 | AR100 | duplicates / image | AP + NMS | "
             "AP gained by NMS | duplicates + NMS |",
             "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
              f"{r['AR100']:.3f} | {r['duplicates_per_image']:.3f} | " + (
                  f"{r['with_nms']['AP']:.3f} | {r['AP_gained_by_nms']:+.3f} | "
                  f"{r['with_nms']['duplicates_per_image']:.3f} |" if "with_nms" in r else
                  "- | - | - |") for r in rows]
    table += ["", "Where the duplicates come from (shares of each variant's duplicates):", "",
              "| variant | duplicates | same level, adjacent cell | same level, farther | "
              "other level | a soft anchor of it | a positive (weight 1) of it | "
              "median score (of the one repeated) |",
              "|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {a['total']} | {a['same_level_adjacent']:.2f} | "
              f"{a['same_level_farther']:.2f} | {a['other_level']:.2f} | "
              f"{a['soft_anchor']:.2f} | {a['positive']:.2f} | {a['median_score']:.2f} "
              f"({a['median_score_of_repeated']:.2f}) |"
              for r in rows for a in [r["anatomy"]]]
    soft = [r for r in rows if r.get("soft_anchors", {}).get("soft_per_image")]
    if soft:
        table += ["", "The trained model against its last soft labels (assignment at t = "
                  f"{soft[0]['soft_anchors']['t_end']:g} on the val images):", "",
                  "| variant | median p, certain positives | median p, soft anchors "
                  "(their target) | soft anchors at p >= 0.3 | soft anchors / image |",
                  "|---|---|---|---|---|"]
        table += [f"| {r['variant']} | {a['median_certain']:.2f} | {a['median_soft']:.2f} "
                  f"({a['median_soft_target']:.2f}) | {a['soft_at_or_above_score']:.2f} | "
                  f"{a['soft_per_image']:.1f} |" for r in soft for a in [r["soft_anchors"]]]
    (out / "results.md").write_text("\n".join(table) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"budget": args.budget, "classes": args.classes, "variant": args.variant,
         "epochs": cfg.train.epochs, "overrides": args.set,
         "train_seconds": timings, "rows": rows}, indent=1))
    print("\n".join(table))


def merged_with_earlier(path: Path, args: argparse.Namespace, rows: list[dict],
                        timings: dict) -> tuple[list[dict], dict]:
    """This run's rows together with those of an earlier run into the same ``--out`` of the
    same setup (budget, classes, digit variant, overrides) for other modes, in the table's
    order: modes trained as separate runs end in one table. A different setup is replaced."""
    if not path.exists():
        return rows, timings
    earlier = json.loads(path.read_text())
    setup = (args.budget, args.classes, args.variant, args.set)
    if (earlier.get("budget"), earlier.get("classes"), earlier.get("variant"),
            earlier.get("overrides")) != setup:
        return rows, timings
    fresh = {r["variant"] for r in rows}
    by_name = {r["variant"]: r for r in earlier["rows"] if r["variant"] not in fresh}
    by_name.update({r["variant"]: r for r in rows})
    order = [name for name, _, _ in VARIANTS]
    merged = sorted(by_name.values(), key=lambda r: order.index(r["variant"])
                    if r["variant"] in order else len(order))
    return merged, {**earlier.get("train_seconds", {}), **timings}


def load_checkpoint_epochs(work: Path) -> int:
    from o2f.checkpoint import load_checkpoint

    return int(load_checkpoint(work / "last.pt")["state"]["epoch"])


if __name__ == "__main__":
    main()
