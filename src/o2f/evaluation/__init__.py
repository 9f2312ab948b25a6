"""Metrics: COCO AP/AR (through faster-coco-eval) and the CrowdHuman benchmark's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from o2f.evaluation.coco import coco_evaluate

__all__ = ["coco_evaluate", "crowdhuman_evaluate", "evaluate_detections"]


def crowdhuman_evaluate(gt_odgt: Any, dt_odgt: Any, **kwargs: Any) -> dict[str, float]:
    """AP, MR (MR^-2), recall and JI by the CrowdHuman protocol; see
    :func:`o2f.evaluation.crowdhuman.crowdhuman_evaluate`."""
    from o2f.evaluation.crowdhuman import crowdhuman_evaluate as _evaluate

    return _evaluate(gt_odgt, dt_odgt, **kwargs)


def evaluate_detections(dataset: Any, results: list[dict[str, Any]], *,
                        results_out: str | Path | None = None,
                        per_class: bool = False) -> dict[str, float]:
    """Score COCO-format ``results`` on ``dataset`` with the metric of its format: the
    twelve COCO numbers, or for CrowdHuman ``.odgt`` data the benchmark's four."""
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
    return coco_evaluate(dataset.coco, results, print_per_class=per_class,
                         results_out=results_out)
