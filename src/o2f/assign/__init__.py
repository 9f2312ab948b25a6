"""Label assignment, one rule per module, side by side:

- ``o2f``  one-to-few, the paper's rule (:mod:`o2f.assign.o2f`);
- ``o2o``  its one-to-one baseline, one-to-few with k = 1;
- ``o2m``  FCOS one-to-many, evaluated with NMS (:mod:`o2f.assign.o2m`);
- ``poto`` DeFCN's prediction-aware one-to-one with optimal matching, optionally with its
  auxiliary one-to-many loss (:mod:`o2f.assign.poto`);
- ``dual`` YOLOv10's consistent dual assignment, one-to-many and one-to-one branches
  (:mod:`o2f.assign.dual`).

Every rule has the signature of :data:`ASSIGNMENTS`' values,
``rule(pred: DensePrediction, gt_boxes (G, 4), gt_labels (G,), cfg: ModelConfig, *, t,
soft_anchors) -> Assignment``, per image and without gradient; the :class:`Assignment` it
returns names the loss that reads it. The detector calls ``ASSIGNMENTS[cfg.assign]``.
"""

from __future__ import annotations

from collections.abc import Callable

from o2f.assign.common import (
    Assignment,
    DensePrediction,
    box_distances,
    candidate_mask,
    candidate_pairs,
    paired_box_iou,
)
from o2f.assign.dual import assign_dual, task_aligned
from o2f.assign.o2f import (
    assign_o2f,
    assign_o2o,
    one_to_few,
    soft_label_ceiling,
    soft_label_ceiling_by_iter,
)
from o2f.assign.o2m import assign_o2m, level_ranges, one_to_many
from o2f.assign.poto import assign_poto, poto, poto_auxiliary

Rule = Callable[..., Assignment]

ASSIGNMENTS: dict[str, Rule] = {
    "o2f": assign_o2f,
    "o2o": assign_o2o,
    "o2m": assign_o2m,
    "poto": assign_poto,
    "dual": assign_dual,
}

__all__ = [
    "ASSIGNMENTS", "Assignment", "DensePrediction", "assign_dual", "assign_o2f", "assign_o2m",
    "assign_o2o", "assign_poto", "box_distances", "candidate_mask", "candidate_pairs",
    "level_ranges", "one_to_few", "one_to_many", "paired_box_iou", "poto", "poto_auxiliary",
    "soft_label_ceiling", "soft_label_ceiling_by_iter", "task_aligned",
]


def get_rule(name: str) -> Rule:
    """The assignment rule ``model.assign`` names; a one-line error listing the rules."""
    if name not in ASSIGNMENTS:
        raise ValueError(f"model.assign must be one of {', '.join(ASSIGNMENTS)}, got '{name}'")
    return ASSIGNMENTS[name]
