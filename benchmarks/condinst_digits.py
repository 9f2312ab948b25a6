"""Instance segmentation on the built-in digits: the ``digits_instance`` preset (CondInst
masks on the O2F detector, one-to-few assignment, no NMS) trained on the CPU within a wall
budget, then box and mask AP on the val split.

    nice -n 19 python benchmarks/condinst_digits.py [--data data/digits_instance]
        [--out runs/condinst_digits] [--budget 15] [--threads 1] [--set key=value ...]

Generates the default sparse digits (600 train / 150 val images, seed 0) in ``--data`` if
missing. Before training it times a few real training steps; when the preset's epochs
(cosine schedule) would not fit in ``--budget`` minutes it trains fewer epochs, so the
schedule still runs to its end, and says so. Evaluation runs once, at the end. Writes
``--out``/results.json (all 24 metrics, epochs, measured speed, wall time) and prints a
Markdown table row.

``--threads 1`` (the default) leaves the second core to the data-loading worker and
degrades gracefully when other jobs share the machine; ``--threads 2`` is faster on an
idle two-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from o2f.config import SplitConfig, load_config
from o2f.data import build_dataset, collate_eval, collate_train
from o2f.data.digits import make_digits
from o2f.engine import epoch_batches, train
from o2f.model.detector import create_model

TARGET_MASK_AP = 0.35


def step_seconds(cfg, steps: int = 4) -> tuple[float, float]:
    """Seconds per training step (batch ``train.batch_size``) and per evaluation batch
    (``train.eval_batch_size``), measured on real data after one warm-up step."""
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    batch = collate_train([train_set[i] for i in range(cfg.train.batch_size)])
    model = create_model(cfg.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        losses = model(batch[0], batch[2], image_sizes=batch[1], t=cfg.model.t_start)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    images, _ = collate_eval([val_set[i] for i in range(cfg.train.eval_batch_size)])
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        model(images)
    return sorted(times[1:])[len(times[1:]) // 2], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/digits_instance")
    parser.add_argument("--out", default="runs/condinst_digits")
    parser.add_argument("--budget", type=float, default=15.0, help="wall minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    data, out = Path(args.data), Path(args.out)
    if not (data / "annotations" / "val.json").exists():
        print(f"generating the sparse digits in {data} ...")
        make_digits(data, variant="sparse", seed=0)
    cfg = load_config("digits_instance", args.overrides)
    cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
    cfg.data.val = SplitConfig(str(data / "annotations/val.json"), str(data / "val"))

    train_s, eval_s = step_seconds(cfg)
    train_set = build_dataset(cfg, "train")
    sizes = [(i["height"], i["width"]) for i in map(train_set.get_image_info,
                                                   range(len(train_set)))]
    iters_per_epoch = len(epoch_batches(sizes, cfg.train.batch_size, cfg.train.seed, 0))
    eval_batches = math.ceil(len(build_dataset(cfg, "val")) / cfg.train.eval_batch_size)
    left = args.budget * 60 - (time.perf_counter() - wall_start)
    reserve = 1.5 * eval_s * eval_batches + 20  # evaluation, checkpoints, start-up
    fits = int((0.9 * left - reserve) // (iters_per_epoch * train_s))
    preset_epochs = cfg.train.epochs
    cfg.train.epochs = max(1, min(preset_epochs, fits))
    cfg.train.eval_every = cfg.train.epochs
    print(f"{train_s:.2f} s per training step, {eval_s:.2f} s per evaluation batch: "
          f"{cfg.train.epochs} of the preset's {preset_epochs} epochs fit in "
          f"{args.budget:g} min")

    for name in ("metrics.jsonl", "log.jsonl", "last.pt"):
        (out / name).unlink(missing_ok=True)  # a fresh run each time
    train_start = time.perf_counter()
    metrics = train(cfg, out)
    train_min = (time.perf_counter() - train_start) / 60
    wall_min = (time.perf_counter() - wall_start) / 60
    result = {"box_AP": metrics["AP"], "mask_AP": metrics["segm_AP"], "metrics": metrics,
              "epochs": cfg.train.epochs, "preset_epochs": preset_epochs,
              "iters": cfg.train.epochs * iters_per_epoch, "threads": args.threads,
              "seconds_per_step": round(train_s, 3), "train_minutes": round(train_min, 2),
              "wall_minutes": round(wall_min, 2), "budget_minutes": args.budget,
              "overrides": args.overrides}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nbox AP {metrics['AP']:.3f} (AP50 {metrics['AP50']:.3f}), mask AP "
          f"{metrics['segm_AP']:.3f} (AP50 {metrics['segm_AP50']:.3f}, AP75 "
          f"{metrics['segm_AP75']:.3f}); {cfg.train.epochs} epochs, {wall_min:.1f} min wall; "
          f"target mask AP >= {TARGET_MASK_AP}: "
          f"{'met' if metrics['segm_AP'] >= TARGET_MASK_AP else 'NOT met'}")
    print("\n| epochs | wall (min) | box AP | box AP50 | mask AP | mask AP50 | mask AP75 |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {cfg.train.epochs} | {wall_min:.1f} | {metrics['AP']:.3f} | "
          f"{metrics['AP50']:.3f} | {metrics['segm_AP']:.3f} | {metrics['segm_AP50']:.3f} | "
          f"{metrics['segm_AP75']:.3f} |")


if __name__ == "__main__":
    main()
