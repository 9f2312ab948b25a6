"""``o2f data check``: what to look at first in a new dataset.

Reads any supported annotation format (:mod:`o2f.data.formats`) and reports:

- images and boxes per class, boxes per image;
- box sizes and aspect ratios, and which FPN level the FCOS size rule
  (largest box side / 2 in (0, 64], (64, 128], (128, 256], (256, 512], above) would give each
  object at the model's input scale;
- how crowded it is: the share of same-image box pairs with IoU above 0.3 and 0.5, the share
  of objects with such a neighbour, and the share of objects whose centre lies inside
  another object's box. Those are the objects where NMS removes true positives (its IoU
  threshold cannot tell a neighbour from a duplicate) and where an NMS-free detector such as
  O2F helps;
- problems, each with the file (and line) it came from: degenerate boxes, boxes reaching
  outside their image, exact duplicates, images without boxes, unused classes, missing
  images;

and with an output folder writes ``check.json``, ``check.png`` (the histograms) and
``sheet.png`` (a contact sheet of images with their boxes drawn).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from o2f.data.formats import read_annotations

__all__ = ["LEVEL_RANGES", "check_dataset", "format_summary"]

LEVEL_RANGES = (64, 128, 256, 512)  # FCOS: P3 up to 64 px of regression distance, P4 ...
LEVEL_NAMES = ("P3", "P4", "P5", "P6", "P7")
_SHOWN = 20  # problems listed per kind in check.json (all are counted)


def _pair_iou(boxes: np.ndarray) -> np.ndarray:
    """(G, G) IoU of x1y1x2y2 boxes, zero on the diagonal."""
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    iou = inter / np.maximum(area[:, None] + area[None, :] - inter, 1e-9)
    np.fill_diagonal(iou, 0.0)
    return iou


def _where(ann: dict[str, Any], ann_file: Path) -> str:
    return str(ann.get("source") or f"{ann_file}: annotation id {ann['id']}")


def check_dataset(data: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                  img_dir: str | os.PathLike | None = None, fmt: str | None = None,
                  split: str = "train", input_size: tuple[int, int] = (800, 1333),
                  sheet_images: int = 12) -> dict[str, Any]:
    """Statistics and problems of a dataset (see the module docstring).

    ``input_size`` is the model's (short side, long side limit) used to place objects on FPN
    levels, (0, 0) for native size. Returns the report that ``check.json`` holds.
    """
    ann_file = Path(data)
    records, root, fmt = read_annotations(ann_file, img_dir, fmt, split)
    images = {img["id"]: img for img in records["images"]}
    cats = sorted(records["categories"], key=lambda c: c["id"])
    names = [str(c.get("name", c["id"])) for c in cats]
    name_of = {c["id"]: n for c, n in zip(cats, names, strict=True)}
    problems: dict[str, list[str]] = {}

    def problem(kind: str, text: str) -> None:
        problems.setdefault(kind, []).append(text)

    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for ann in records["annotations"]:
        img = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            problem("degenerate box (dropped)", f"{_where(ann, ann_file)}: {w:g} x {h:g} px")
            continue
        if x < 0 or y < 0 or x + w > img["width"] or y + h > img["height"]:
            inside = x < img["width"] and y < img["height"] and x + w > 0 and y + h > 0
            problem("box partly outside its image (clipped)" if inside
                    else "box outside its image (dropped)",
                    f"{_where(ann, ann_file)}: [{x:g}, {y:g}, {x + w:g}, {y + h:g}] in "
                    f"{img['width']} x {img['height']}")
        by_image[ann["image_id"]].append(ann)
    for image_id, anns in by_image.items():
        if not anns:
            problem("image without boxes", str(images[image_id]["file_name"]))
    missing = [str(img["file_name"]) for img in records["images"]
               if not (root / img["file_name"]).is_file()]
    for name in missing:
        problem("image file missing", str(root / name))

    # per-object statistics at the model's input scale
    sides, aspects, levels, labels = [], [], [], []
    pairs = pairs3 = pairs5 = 0
    near3 = near5 = centre_inside = crowd_objects = 0
    per_image = []
    for image_id, anns in by_image.items():
        plain = [a for a in anns if not a.get("iscrowd", 0)]
        per_image.append(len(plain))
        if not plain:
            continue
        img = images[image_id]
        short, long_ = sorted((img["width"], img["height"]))
        lo, hi = input_size
        scale = min(lo / short, hi / long_) if lo > 0 else 1.0
        xywh = np.array([a["bbox"] for a in plain], dtype=np.float64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        side = np.sqrt(xywh[:, 2] * xywh[:, 3]) * scale
        sides.append(side)
        aspects.append(xywh[:, 3] / xywh[:, 2])  # height / width
        levels.append(np.searchsorted(LEVEL_RANGES, xywh[:, 2:].max(1) * scale / 2))
        labels += [a["category_id"] for a in plain]
        g = len(plain)
        if g < 2:
            continue
        iou = _pair_iou(boxes)
        upper = iou[np.triu_indices(g, k=1)]
        pairs += len(upper)
        pairs3 += int((upper > 0.3).sum())
        pairs5 += int((upper > 0.5).sum())
        near3 += int((iou > 0.3).any(1).sum())
        near5 += int((iou > 0.5).any(1).sum())
        dup = np.argwhere(np.triu(iou > 0.99, k=1))
        for i, j in dup:
            if plain[i]["category_id"] == plain[j]["category_id"]:
                problem("duplicate box", f"{_where(plain[j], ann_file)}: same as "
                                         f"{_where(plain[i], ann_file)}")
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = ((centre[:, None, :] > boxes[None, :, :2]) &
                  (centre[:, None, :] < boxes[None, :, 2:])).all(2)
        np.fill_diagonal(inside, False)
        centre_inside += int(inside.any(1).sum())
        crowd_objects += g

    side = np.concatenate(sides) if sides else np.zeros(0)
    aspect = np.concatenate(aspects) if aspects else np.zeros(0)
    level = np.concatenate(levels) if levels else np.zeros(0, np.int64)
    n_obj = len(side)
    boxes_per_class = Counter(labels)
    images_per_class = Counter(cid for anns in by_image.values()
                               for cid in {a["category_id"] for a in anns
                                           if not a.get("iscrowd", 0)})
    for c in cats:
        if boxes_per_class[c["id"]] == 0:
            problem("class without boxes", name_of[c["id"]])
    counts = np.array(per_image) if per_image else np.zeros(0)

    def share(k: int, n: int) -> float:
        return round(k / n, 4) if n else 0.0

    def pct(v: np.ndarray) -> dict[str, float]:
        if not len(v):
            return {}
        p = np.percentile(v, [5, 50, 95])
        return {"min": round(float(v.min()), 2), "p5": round(float(p[0]), 2),
                "median": round(float(p[1]), 2), "p95": round(float(p[2]), 2),
                "max": round(float(v.max()), 2)}

    report: dict[str, Any] = {
        "annotations": str(ann_file), "format": fmt, "image_dir": str(root),
        "num_images": len(images), "num_boxes": n_obj,
        "num_ignore_regions": sum(bool(a.get("iscrowd", 0)) for a in records["annotations"]),
        "classes": [{"name": name_of[c["id"]], "boxes": boxes_per_class[c["id"]],
                     "images": images_per_class[c["id"]]} for c in cats],
        "boxes_per_image": {"mean": round(float(counts.mean()), 2) if len(counts) else 0.0,
                            **pct(counts)},
        "input_size": list(input_size),
        "box_side_px": pct(side),  # sqrt(w * h) at the input scale
        "aspect_h_over_w": pct(aspect),
        "fpn_level_share": {LEVEL_NAMES[i]: share(int((level == i).sum()), n_obj)
                            for i in range(len(LEVEL_NAMES))},
        "crowding": {
            "pairs": pairs,
            "pairs_iou_above_0.3": share(pairs3, pairs),
            "pairs_iou_above_0.5": share(pairs5, pairs),
            "pairs_iou_above_0.5_per_image": round(pairs5 / max(len(images), 1), 3),
            "objects_with_neighbour_iou_above_0.3": share(near3, n_obj),
            "objects_with_neighbour_iou_above_0.5": share(near5, n_obj),
            "objects_centre_inside_another_box": share(centre_inside, n_obj),
        },
        "problems": {k: {"count": len(v), "first": v[:_SHOWN]} for k, v in problems.items()},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.json").write_text(json.dumps(report, indent=1) + "\n")
        _plot(report, side, aspect, level, counts, out / "check.png")
        _contact_sheet(records, root, out / "sheet.png", sheet_images, names)
    return report


def format_summary(report: dict[str, Any]) -> str:
    """The report as a few lines of text for the terminal."""
    c = report["crowding"]
    lines = [
        f"{report['annotations']} ({report['format']}): {report['num_images']} images, "
        f"{report['num_boxes']} boxes, {len(report['classes'])} classes, "
        f"{report['num_ignore_regions']} ignore regions",
        "boxes per image: " + ", ".join(f"{k} {v}" for k, v in report["boxes_per_image"].items()),
        "per class (boxes / images): " + ", ".join(
            f"{k['name']} {k['boxes']}/{k['images']}" for k in report["classes"][:20])
        + (", ..." if len(report["classes"]) > 20 else ""),
        f"box side sqrt(w*h) at input size {report['input_size']}: "
        + ", ".join(f"{k} {v}" for k, v in report["box_side_px"].items()),
        "FPN level by the FCOS size rule: " + ", ".join(
            f"{k} {v:.0%}" for k, v in report["fpn_level_share"].items()),
        f"crowding: {c['pairs_iou_above_0.3']:.1%} of same-image pairs overlap above IoU 0.3, "
        f"{c['pairs_iou_above_0.5']:.1%} above 0.5 ({c['pairs_iou_above_0.5_per_image']} per "
        f"image); {c['objects_with_neighbour_iou_above_0.5']:.1%} of objects have a neighbour "
        f"above 0.5; {c['objects_centre_inside_another_box']:.1%} have their centre inside "
        f"another box",
    ]
    if c["objects_with_neighbour_iou_above_0.5"] > 0.05:
        lines.append("  -> crowded: NMS at IoU 0.5 would suppress some of these true objects; "
                     "an NMS-free detector (o2f) keeps them")
    problems = report["problems"]
    if not problems:
        lines.append("problems: none found")
    for kind, p in problems.items():
        lines.append(f"problem: {p['count']} x {kind}, e.g. {p['first'][0]}")
    return "\n".join(lines)


def _plot(report: dict[str, Any], side: np.ndarray, aspect: np.ndarray, level: np.ndarray,
          counts: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    classes = report["classes"][:40]
    ax[0, 0].bar(range(len(classes)), [k["boxes"] for k in classes], color="#4363d8")
    ax[0, 0].set_xticks(range(len(classes)), [k["name"] for k in classes], rotation=60,
                        fontsize=7, ha="right")
    ax[0, 0].set_title("boxes per class")
    ax[0, 1].hist(counts, bins=min(40, max(int(counts.max()) + 1, 1)) if len(counts) else 1,
                  color="#3cb44b")
    ax[0, 1].set_title("boxes per image")
    if len(side):
        bins = np.geomspace(max(side.min(), 1.0), max(side.max(), 2.0) * 1.01, 40)
        colours = ["#e6194b", "#f58231", "#ffe119", "#3cb44b", "#4363d8"]
        ax[1, 0].hist([side[level == i] for i in range(5)], bins=bins, stacked=True,
                      color=colours, label=[f"{n} {report['fpn_level_share'][n]:.0%}"
                                            for n in LEVEL_NAMES])
        ax[1, 0].set_xscale("log")
        for r in LEVEL_RANGES:  # a square box of side 2r is on the boundary
            ax[1, 0].axvline(2 * r, color="grey", ls="--", lw=0.8)
        ax[1, 0].legend(fontsize=8, title="FCOS level", title_fontsize=8)
        ax[1, 1].hist(aspect, bins=np.geomspace(max(aspect.min(), 0.05),
                                                min(aspect.max(), 20) * 1.01 + 1e-3, 40),
                      color="#911eb4")
        ax[1, 1].set_xscale("log")
    ax[1, 0].set_title(f"box side sqrt(w*h), px at input size {report['input_size']}")
    ax[1, 1].set_title("aspect ratio h / w")
    c = report["crowding"]
    fig.suptitle(f"{Path(report['annotations']).name}: {report['num_images']} images, "
                 f"{report['num_boxes']} boxes; pairs IoU>0.5: {c['pairs_iou_above_0.5']:.1%}, "
                 f"centre inside another box: {c['objects_centre_inside_another_box']:.1%}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _contact_sheet(records: dict, root: Path, path: Path, n: int, names: list[str],
                   thumb: int = 256) -> None:
    """The first ``n`` images with boxes, ground truth drawn, tiled 4 per row."""
    import torch
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes, make_grid

    from o2f.data.coco import ImageReadError, load_image
    from o2f.predict import PALETTE

    label_of = {c["id"]: i for i, c in enumerate(sorted(records["categories"],
                                                        key=lambda c: c["id"]))}
    by_image: dict[int, list[dict]] = {}
    for ann in records["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    tiles = []
    for img in records["images"]:
        if len(tiles) >= n:
            break
        anns = [a for a in by_image.get(img["id"], []) if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not anns:
            continue
        try:
            image = load_image(root / img["file_name"]).as_subclass(torch.Tensor)
        except ImageReadError:
            continue
        h, w = image.shape[-2:]
        s = thumb / max(h, w)
        image = torch.nn.functional.interpolate(image[None].float(), scale_factor=s,
                                                mode="bilinear", antialias=True)[0]
        image = image.clamp(0, 255).to(torch.uint8)
        boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in
                              (a["bbox"] for a in anns)], dtype=torch.float32) * s
        labels = [label_of[a["category_id"]] for a in anns]
        image = draw_bounding_boxes(image, boxes, [names[k] for k in labels],
                                    colors=[PALETTE[k % len(PALETTE)] for k in labels],
                                    width=1)
        canvas = torch.zeros(3, thumb, thumb, dtype=torch.uint8)
        canvas[:, :image.shape[1], :image.shape[2]] = image
        tiles.append(canvas)
    if not tiles:
        return
    grid = make_grid(tiles, nrow=4, padding=4, pad_value=255)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
