"""Metrics: COCO AP/AR (through faster-coco-eval), the CrowdHuman benchmark's own, and the
duplicate rate of end-to-end detectors (:mod:`o2f.evaluation.duplicates`).

For instance segmentation (results that carry a ``segmentation``) :func:`evaluate_detections`
returns the twelve box numbers under their usual names (AP, AP50, ..., ARl) and the twelve
mask numbers of ``COCOeval(iouType="segm")`` with a ``segm_`` prefix (segm_AP, segm_AP50,
segm_AP75, segm_APs, segm_APm, segm_APl, segm_AR1, segm_AR10, segm_AR100, segm_ARs,
segm_ARm, segm_ARl).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from o2f.evaluation.coco import _write_json, coco_evaluate
from o2f.evaluation.duplicates import duplicate_rate

__all__ = ["coco_evaluate", "crowdhuman_evaluate", "duplicate_rate", "evaluate_detections"]


def crowdhuman_evaluate(gt_odgt: Any, dt_odgt: Any, **kwargs: Any) -> dict[str, float]:
    """AP, MR (MR^-2), recall and JI by the CrowdHuman protocol; see
    :func:`o2f.evaluation.crowdhuman.crowdhuman_evaluate`."""
    from o2f.evaluation.crowdhuman import crowdhuman_evaluate as _evaluate

    return _evaluate(gt_odgt, dt_odgt, **kwargs)


def evaluate_detections(dataset: Any, results: list[dict[str, Any]], *,
                        results_out: str | Path | None = None,
                        per_class: bool = False, segm: bool | None = None
                        ) -> dict[str, float]:
    """Score COCO-format ``results`` on ``dataset`` with the metric of its format: the
    twelve COCO numbers, or for CrowdHuman ``.odgt`` data the benchmark's four. With
    ``segm`` (default: when any result carries a ``segmentation``) the twelve mask numbers
    follow with a ``segm_`` prefix (see the module docstring)."""
    if getattr(dataset, "format", "coco") == "odgt":
        records: dict[str, list[dict[str, Any]]] = {}
        id_to_name = {int(img["id"]): Path(img["file_name"]).stem
                      for img in dataset.coco.dataset["images"]}
        for r in results:
            records.setdefault(id_to_name[r["image_id"]], []).append(
                {"box": r["bbox"], "score": r["score"], "tag": 1})
        dt = [{"ID": k, "dtboxes": v} for k, v in records.items()]
        sizes = {Path(img["file_name"]).stem: (img["height"], img["width"])
                 for img in dataset.coco.dataset["images"]}
        if results_out is not None:
            from o2f.data.crowdhuman import write_odgt

            write_odgt(dt, results_out)
        return crowdhuman_evaluate(dataset.source_file, dt, image_sizes=sizes)
    if segm is None:
        segm = any("segmentation" in r for r in results)
    if not segm:
        return coco_evaluate(dataset.coco, results, print_per_class=per_class,
                             results_out=results_out)
    if results_out is not None:
        _write_json(results_out, results)
    # Each evaluation sees only its own geometry: with a bbox in a segm result pycocotools
    # would take the box's area for the small / medium / large ranges.
    boxes = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    masks = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
    if per_class:
        print("box AP per class:")
    metrics = coco_evaluate(dataset.coco, boxes, print_per_class=per_class)
    if per_class:
        print("mask AP per class:")
    mask_metrics = coco_evaluate(dataset.coco, masks, iou_type="segm",
                                 print_per_class=per_class)
    return {**metrics, **{f"segm_{k}": v for k, v in mask_metrics.items()}}
