"""COCO box (and mask) AP with faster-coco-eval: pycocotools' numbers, several times faster.

``coco_evaluate`` returns the twelve numbers of pycocotools' ``COCOeval.stats`` under the
names AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl, on the 0-1 scale.
As in pycocotools, a number with nothing to measure (e.g. APs without small objects) is -1.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

__all__ = ["STAT_NAMES", "coco_evaluate", "format_per_class", "per_class_ap"]

logger = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def _as_coco(gt: Any) -> COCO:
    """A faster-coco-eval ``COCO`` from a path, a dict, or a (pycocotools or faster) COCO."""
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        return COCO(str(gt), print_function=_quiet)
    if not isinstance(gt, Mapping) and isinstance(getattr(gt, "dataset", None), Mapping):
        gt = gt.dataset  # a pycocotools.coco.COCO
    if isinstance(gt, Mapping):
        # Evaluation writes flags ("ignore", ...) into the annotation dicts: give it copies
        # of those (cheap) rather than of the whole dataset.
        data = {**gt, "annotations": [dict(a) for a in gt.get("annotations", [])]}
        return COCO(data, print_function=_quiet)
    raise TypeError(f"gt_json must be a path, a dict or a COCO object, got {type(gt).__name__}")


def _load_detections(detections: str | os.PathLike | Sequence[Mapping]) -> list[dict]:
    if isinstance(detections, (str, os.PathLike)):
        with open(detections, encoding="utf-8") as f:
            loaded = json.load(f)
        if not isinstance(loaded, list):
            raise ValueError(f"{detections}: a COCO results file must hold a JSON list")
        detections = loaded
    # copies: loading results adds keys (id, area, ...) to every dict
    return [dict(d) for d in detections]


def coco_evaluate(
    gt_json: Any,
    detections: str | os.PathLike | Sequence[Mapping],
    iou_type: str = "bbox",
    *,
    print_per_class: bool = False,
    results_out: str | os.PathLike | None = None,
) -> dict[str, float]:
    """COCO AP / AR of ``detections`` against ``gt_json``.

    Args:
        gt_json: ground truth: a COCO JSON path, its dict, or a pycocotools /
            faster-coco-eval ``COCO`` object.
        detections: a COCO results JSON path or the list itself: dicts with ``image_id``,
            ``category_id`` (the dataset's ids, not 0-based labels), ``bbox`` [x, y, w, h] in
            original-image pixels, ``score`` (and ``segmentation`` RLE for ``iou_type="segm"``).
        iou_type: "bbox" or "segm".
        print_per_class: also print a table of per-class AP.
        results_out: write the detections there as a COCO results JSON.

    Returns:
        ``{name: value}`` for the twelve :data:`STAT_NAMES`, floats on the 0-1 scale, the same
        numbers (and order) as pycocotools' ``COCOeval.stats``. No detections at all gives
        zeros.
    """
    dets = _load_detections(detections)
    if results_out is not None:
        _write_json(results_out, dets)
    if not dets:
        logger.warning("coco_evaluate: no detections; every metric is 0")
        return dict.fromkeys(STAT_NAMES, 0.0)

    coco_gt = _as_coco(gt_json)
    unknown = {d["image_id"] for d in dets} - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(
            f"{len(unknown)} detected image ids are not in the ground truth "
            f"(first: {sorted(unknown, key=str)[:5]})"
        )
    evaluator = _run(coco_gt, coco_gt.loadRes(dets), iou_type)
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:12], strict=True)}
    if print_per_class:
        print(format_per_class(per_class_ap(evaluator)))
    return stats


def _run(coco_gt: COCO, coco_dt: COCO, iou_type: str) -> COCOeval_faster:
    # separate_eval=True runs pycocotools' two steps (per-image matching, then accumulation)
    # in C++; the numbers equal pycocotools' up to float rounding (~1e-17; see the tests).
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=_quiet,
                                separate_eval=True)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def per_class_ap(evaluator: COCOeval_faster) -> dict[str, float]:
    """AP@[.5:.95] (all areas, 100 detections) of each category, keyed by category name,
    in category-id order, from an evaluator that has run ``accumulate``. NaN for a category
    without ground truth."""
    precision = evaluator.eval["precision"]  # T x R x K x A x M
    cats = evaluator.cocoGt.loadCats(evaluator.params.catIds)
    out = {}
    for k, cat in enumerate(cats):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[str(cat.get("name", cat["id"]))] = float(np.mean(p)) if p.size else math.nan
    return out


def format_per_class(ap: Mapping[str, float], columns: int = 3) -> str:
    """A text table of ``{class name: AP}`` (AP in percent), ``columns`` pairs per row."""
    cells = [(name, "-" if math.isnan(v) else f"{100 * v:.1f}") for name, v in ap.items()]
    if not cells:
        return ""
    name_w = max(len("category"), *(len(n) for n, _ in cells))
    ap_w = max(len("AP"), *(len(v) for _, v in cells))
    head = " | ".join(f"{'category':<{name_w}}  {'AP':>{ap_w}}" for _ in range(columns))
    lines = [head, "-" * len(head)]
    for i in range(0, len(cells), columns):
        row = cells[i:i + columns]
        lines.append(" | ".join(f"{n:<{name_w}}  {v:>{ap_w}}" for n, v in row))
    return "\n".join(lines)


def _write_json(path: str | os.PathLike, dets: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dets, f, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, bytes):  # RLE counts
        return o.decode("ascii")
    if hasattr(o, "tolist"):  # torch tensors
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
