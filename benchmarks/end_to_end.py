"""End to end in fact: how much NMS still adds to o2f, under the release's recipe and under
each lever that targets the remaining duplicates (docs/ablation.md, "End to end in fact").

    python benchmarks/end_to_end.py --budget 1 [--classes 1] [--variant crowd] [--jobs 3]
        [--levers release t_end0 ...] [--seed 0] [--out runs/e2e]

Each lever is one run of ``benchmarks/ablation.py --modes o2f`` with its own ``--set``
overrides (same data, seed, data order and iterations as the release's recipe); runs
whose results exist are not trained again. ``--jobs`` runs several at once, one thread
each (on a small shared machine that is faster overall than one run on all cores). Prints
and writes ``end_to_end_<variant><classes>_x<budget>.md``: AP (AP50, AP75) without and
with NMS, the AP gained by NMS, duplicates per image (score >= 0.3) without and with NMS,
the AP with exactly those duplicates left out (the bound of a perfect duplicate removal),
and how the model's scores at its certain positives and soft anchors ended.
``--reevaluate`` evaluates finished runs again (for columns added since they ran).
``--seed N`` trains with another ``train.seed`` (initialisation and data order; the data
stay those of seed 0): run-to-run noise, measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (what it changes, overrides); "release" is the recipe of the authors' code.
# strict-e2e with the certain positive labelled by its IoU and t ending at 0.1, the base of
# the levers named strict_ciou_t01*
STRICT_IOU_T01 = ["model.recipe=strict-e2e", "model.certain_label=iou", "model.t_end=0.1"]

LEVERS: dict[str, tuple[str, list[str]]] = {
    "release": ("release recipe (t 0.6 -> 0.2 by epoch)", []),
    "tend0": ("t ends at 0 instead of 0.2", ["model.t_end=0.0"]),
    "iter50": ("t by iteration, reaches 0.2 at half of training and holds",
               ["model.t_schedule=iter", "model.t_end_at=0.5"]),
    "o2o75": ("soft anchors are negatives in the last quarter", ["model.o2o_from=0.75"]),
    "mf": ("3D max filter on the objectness branch", ["model.max_filter=true"]),
    "t0o2o": ("t ends at 0, soft anchors negatives in the last quarter",
              ["model.t_end=0.0", "model.o2o_from=0.75"]),
    "combo": ("3D max filter + t by iteration to 0 at half of training",
              ["model.max_filter=true", "model.t_schedule=iter", "model.t_end_at=0.5",
               "model.t_end=0.0"]),
    "centred": ("certain positive by quality x centerness of the point",
                ["model.certain_by=centred"]),
    "centred_t0": ("certain positive by quality x centerness, t ends at 0",
                   ["model.certain_by=centred", "model.t_end=0.0"]),
    "sw1_t0": ("soft anchors at weight 1.0 instead of 0.4, t ends at 0",
               ["model.soft_weight=1.0", "model.t_end=0.0"]),
    "swe1_t0": ("soft anchors' weight 0.4 -> 1.0 with t, t ends at 0",
                ["model.soft_weight_end=1.0", "model.t_end=0.0"]),
    "swe2_t0": ("soft anchors' weight 0.4 -> 2.0 with t, t ends at 0",
                ["model.soft_weight_end=2.0", "model.t_end=0.0"]),
    "swe3_t0": ("soft anchors' weight 0.4 -> 3.0 with t, t ends at 0",
                ["model.soft_weight_end=3.0", "model.t_end=0.0"]),
    "score": ("certain positive: the pick the network scores highest",
              ["model.certain_by=score"]),
    "score_t0": ("certain positive the highest-scoring pick, t ends at 0",
                 ["model.certain_by=score", "model.t_end=0.0"]),
    "cil": ("certain positive: on the best pick's level, the cell nearest the centre",
            ["model.certain_by=centred_in_level"]),
    "cil_t0": ("certain on the best pick's level nearest the centre, t ends at 0",
               ["model.certain_by=centred_in_level", "model.t_end=0.0"]),
    "swe2_t0_late": ("soft weight 0.4 held to half of t's fall, then -> 2.0; t ends at 0",
                     ["model.soft_weight_end=2.0", "model.soft_weight_from=0.5",
                      "model.t_end=0.0"]),
    "swe3_t0_late": ("soft weight 0.4 held to half of t's fall, then -> 3.0; t ends at 0",
                     ["model.soft_weight_end=3.0", "model.soft_weight_from=0.5",
                      "model.t_end=0.0"]),
    "obj_swe1_t0": ("soft weight 0.4 -> 1.0, t ends at 0, the push through objectness only",
                    ["model.soft_push=obj", "model.soft_weight_end=1.0", "model.t_end=0.0"]),
    "obj_swe2_t0": ("soft weight 0.4 -> 2.0, t ends at 0, the push through objectness only",
                    ["model.soft_push=obj", "model.soft_weight_end=2.0", "model.t_end=0.0"]),
    "iou": ("certain positive: the pick with the best predicted box (IoU alone)",
            ["model.certain_by=iou"]),
    "iou_swe3_t0_late": ("certain by IoU alone; soft weight held to half of t's fall, then "
                         "-> 3.0; t ends at 0",
                         ["model.certain_by=iou", "model.soft_weight_end=3.0",
                          "model.soft_weight_from=0.5", "model.t_end=0.0"]),
    "strict_t01": ("strict-e2e with t ending at 0.1 (soft labels kept below the duplicate "
                   "score)", ["model.recipe=strict-e2e", "model.t_end=0.1"]),
    "strict_t02": ("strict-e2e with t ending at 0.2, the release's end",
                   ["model.recipe=strict-e2e", "model.t_end=0.2"]),
    "strict_cbw3": ("strict-e2e with the certain positive's box loss weighing 3x",
                    ["model.recipe=strict-e2e", "model.certain_box_weight=3.0"]),
    "strict_a06": ("strict-e2e with quality p^0.4 IoU^0.6 (alpha 0.6): the role stays "
                   "with the cell that scores", ["model.recipe=strict-e2e", "model.alpha=0.6"]),
    "strict_ciou": ("strict-e2e with the certain positive labelled by its IoU",
                    ["model.recipe=strict-e2e", "model.certain_label=iou"]),
    "strict_ciou_t01": ("strict-e2e, the certain positive labelled by its IoU, t ending at 0.1",
                        [*STRICT_IOU_T01]),
    "strict_ciou_t02": ("strict-e2e, the certain positive labelled by its IoU, t ending at 0.2",
                        ["model.recipe=strict-e2e", "model.certain_label=iou",
                         "model.t_end=0.2"]),
    "strict_top": ("strict-e2e, a soft anchor outscoring its certain positive spared (weight "
                   "0.4)", ["model.recipe=strict-e2e", "model.soft_weight_top=0.4"]),
    "strict_ciou_t01_top": ("strict-e2e, IoU label, t ending at 0.1, a soft anchor outscoring "
                            "its certain positive spared (weight 0.4)",
                            [*STRICT_IOU_T01, "model.soft_weight_top=0.4"]),
    "strict_leader": ("strict-e2e, certain positive: the best-scored pick within 0.05 of "
                      "the best quality", ["model.recipe=strict-e2e", "model.certain_by=leader"]),
    "strict_ciou_t01_leader": ("strict-e2e, IoU label, t ending at 0.1, certain positive: the "
                               "best-scored pick within 0.05 of the best quality",
                               [*STRICT_IOU_T01, "model.certain_by=leader"]),
    "strict_mf": ("strict-e2e with DeFCN's 3D max filter", ["model.recipe=strict-e2e",
                                                            "model.max_filter=true"]),
    "strict_ciou_t01_mf": ("strict-e2e, IoU label, t ending at 0.1, DeFCN's 3D max filter",
                           [*STRICT_IOU_T01, "model.max_filter=true"]),
    "strict_aux": ("strict-e2e, a training-only branch on the release's recipe (features "
                   "from it alone)", ["model.recipe=strict-e2e", "model.aux_branch=release"]),
    "strict_ciou_t01_aux": ("strict-e2e, IoU label, t ending at 0.1, a training-only branch on "
                            "the release's recipe", [*STRICT_IOU_T01, "model.aux_branch=release"]),
    "strict_cap_t02": ("strict-e2e, t ending at 0.2, the heavy weight only on soft anchors "
                       "scoring >= 0.25", ["model.recipe=strict-e2e", "model.t_end=0.2",
                                           "model.soft_cap=0.25"]),
    "strict_ciou_cap_t01": ("strict-e2e, IoU label, t ending at 0.1, the heavy weight only on "
                            "soft anchors scoring >= 0.25",
                            [*STRICT_IOU_T01, "model.soft_cap=0.25"]),
    "strict_k4": ("strict-e2e with 3 soft anchors per object instead of 6",
                  ["model.recipe=strict-e2e", "model.o2f_topk=4"]),
    "strict_ciou_t01_k4": ("strict-e2e, IoU label, t ending at 0.1, 3 soft anchors per object "
                           "instead of 6", [*STRICT_IOU_T01, "model.o2f_topk=4"]),
    "vote": ("each cell's box a learnt mean of its 3x3 neighbours' (box voting in the network)",
             ["model.box_vote=true"]),
    "strict_vote": ("strict-e2e with box voting in the network",
                    ["model.recipe=strict-e2e", "model.box_vote=true"]),
    "strict_ciou_t01_vote": ("strict-e2e, IoU label, t ending at 0.1, box voting in the network",
                             [*STRICT_IOU_T01, "model.box_vote=true"]),
    "big_head": ("the release's recipe with a head of 4 convs at 128 channels (2 at 64)",
                 ["model.head_convs=4", "model.head_channels=128"]),
    "strict_ciou_t01_big_head": ("strict-e2e, IoU label, t ending at 0.1, a head of 4 convs "
                                 "at 128 channels", [*STRICT_IOU_T01, "model.head_convs=4",
                                                     "model.head_channels=128"]),
    "rescore": ("the release's recipe, its top-k rescored by a learnt relation network over "
                "overlapping detections, its lr decaying with the detector's",
                ["model.rescore=true", "train.rescore_schedule=cosine",
                 "train.rescore_lr_mult=1.0"]),
    "rescore_flat": ("the same rescorer, its lr held (no decay)",
                     ["model.rescore=true", "train.rescore_schedule=constant",
                      "train.rescore_lr_mult=1.0"]),
    "rescore_flat3": ("the same rescorer, its lr held at 3x the detector's base lr: "
                      "model.rescore=true", ["model.rescore=true",
                                             "train.rescore_schedule=constant",
                                             "train.rescore_lr_mult=3.0"]),
    "leader": ("certain positive: the best-scored pick within 0.05 of the best quality",
               ["model.certain_by=leader"]),
    "ciou": ("the certain positive labelled by its IoU", ["model.certain_label=iou"]),
    "cbw3": ("the certain positive's box loss weighing 3x", ["model.certain_box_weight=3.0"]),
    "swe3_t0_late_cw2": ("strict-e2e with each certain positive weighing 2",
                         ["model.recipe=strict-e2e", "model.certain_weight=2.0"]),
    "swe3_t0_late_cw3": ("strict-e2e with each certain positive weighing 3",
                         ["model.recipe=strict-e2e", "model.certain_weight=3.0"]),
    "rank1": ("certain-positive ranking loss, weight 0 -> 1 with t",
              ["model.rank_weight=1.0"]),
    "rank1_t0": ("certain-positive ranking loss, weight 0 -> 1 with t, t ends at 0",
                 ["model.rank_weight=1.0", "model.t_end=0.0"]),
}


def seed_suffix(seed: int) -> str:
    """What a run folder or table file of ``--seed`` adds to its name (none for seed 0)."""
    return f"_seed{seed}" if seed else ""


def run_dir(out: Path, variant: str, classes: int, lever: str, budget: float,
            seed: int = 0) -> Path:
    return out / f"{variant[0]}{classes}_{lever}_x{budget:g}{seed_suffix(seed)}"


def launch(out: Path, variant: str, classes: int, lever: str, budget: float, seed: int = 0
           ) -> subprocess.Popen:
    work = run_dir(out, variant, classes, lever, budget, seed)
    cmd = [sys.executable, str(Path(__file__).with_name("ablation.py")), "--out", str(work),
           "--modes", "o2f", "--budget", f"{budget:g}", "--classes", str(classes),
           "--variant", variant]
    overrides = [*LEVERS[lever][1], *([f"train.seed={seed}"] if seed else [])]
    if overrides:
        cmd += ["--set", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(f"{work}.log", "w") as log:  # the child keeps its own copy of the handle
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def table(out: Path, variant: str, classes: int, levers: list[str], budget: float,
          seed: int = 0) -> str:
    lines = ["| lever | epochs | AP | AP50 | AP75 | AP + NMS | AP gained by NMS | "
             "duplicates / image | duplicates + NMS | AP, duplicates removed | "
             "AP (AP75), one box per object | objects whose peak box / best box has IoU "
             ">= 0.75 | median p certain | median p soft (target) | soft anchors at p >= 0.3 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for lever in levers:
        path = run_dir(out, variant, classes, lever, budget, seed) / "results.json"
        if not path.exists():
            lines.append(f"| {LEVERS[lever][0]} | - | not run |" + " |" * 12)
            continue
        result = json.loads(path.read_text())
        row = result["rows"][0]
        nms, soft = row["with_nms"], row.get("soft_anchors", {})
        dedup = row.get("without_duplicates", {}).get("AP")
        one = row.get("one_box_per_object")
        one_box = "-" if one is None else f"{one['AP']:.3f} ({one['AP75']:.3f})"
        peak = ("-" if "peak_iou_75" not in soft else
                f"{soft['peak_iou_75']:.2f} / {soft['best_iou_75']:.2f}")
        lines.append(
            f"| {LEVERS[lever][0]} | {result['epochs']} | {row['AP']:.3f} | "
            f"{row['AP50']:.3f} | {row['AP75']:.3f} | {nms['AP']:.3f} | "
            f"{row['AP_gained_by_nms']:+.3f} | {row['duplicates_per_image']:.2f} | "
            f"{nms['duplicates_per_image']:.2f} | "
            f"{'-' if dedup is None else f'{dedup:.3f}'} | "
            f"{one_box} | {peak} | "
            f"{soft.get('median_certain', 0):.2f} | "
            f"{soft.get('median_soft', 0):.2f} ({soft.get('median_soft_target', 0):.2f}) | "
            f"{soft.get('soft_at_or_above_score', 0):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/e2e")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="multiplies the digits preset's 8 epochs")
    parser.add_argument("--classes", type=int, choices=[1, 10], default=1)
    parser.add_argument("--variant", choices=["crowd", "sparse"], default="crowd")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument("--seed", type=int, default=0,
                        help="train.seed of the runs (0: the table's runs; the data stay seed 0's)")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished runs again (their checkpoints are kept)")
    parser.add_argument("--collect", action="store_true",
                        help="only print the table of the runs already done")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if not args.collect:
        todo = [lever for lever in args.levers if args.reevaluate or not (run_dir(
            out, args.variant, args.classes, lever, args.budget, args.seed) / "results.json"
        ).exists()]
        running: list[subprocess.Popen] = []
        while todo or running:
            while todo and len(running) < max(args.jobs, 1):
                running.append(launch(out, args.variant, args.classes, todo.pop(0),
                                      args.budget, args.seed))
            time.sleep(5)
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                if proc.returncode:
                    print(f"a run failed ({proc.args[3]}.log): exit {proc.returncode}")
    text = table(out, args.variant, args.classes, args.levers, args.budget, args.seed)
    name = f"end_to_end_{args.variant}{args.classes}_x{args.budget:g}{seed_suffix(args.seed)}.md"
    (out / name).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
