"""What ``model.rescore`` costs in time: a training step and a prediction of the digits
preset with and without the rescorer, measured in the same run (docs/ablation.md, "End to
end in fact").

    python benchmarks/rescore_speed.py [--classes 10] [--repeats 20] [--threads 2]

Random canvases of the crowd digits' size (320 x 320), a batch of 8 for training (the
preset's), one image for prediction; each timing the median of ``--repeats`` after two
warm-up runs; the same weights for both models apart from the rescorer. Prints seconds and
the ratio with / without.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from o2f.bench import timed
from o2f.config import load_config
from o2f.model.detector import O2F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 320, 320, generator=generator) for _ in range(8)]
    targets = []
    for _ in images:
        xy = torch.rand(14, 2, generator=generator) * 260
        wh = torch.rand(14, 2, generator=generator) * 40 + 20
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=320)], 1),
                        "labels": torch.randint(args.classes, (14,), generator=generator)})
    rows = {}
    for name, overrides in (("release", []), ("release + rescore", ["model.rescore=true"])):
        torch.manual_seed(0)
        cfg = load_config("digits", [f"model.num_classes={args.classes}", *overrides])
        model = O2F(cfg.model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            model.train()
            loss = sum(model(images, targets, t=0.4).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def predict(model=model) -> None:
            model.eval()
            with torch.inference_mode():
                model(images[:1])

        rows[name] = (statistics.median(timed(step, args.repeats, warmup=2)),
                      statistics.median(timed(predict, args.repeats, warmup=2)))
    base_train, base_predict = rows["release"]
    print(f"threads {args.threads}, {args.classes} classes")
    print("| model | training step (batch 8) | ratio | prediction (1 image) | ratio |")
    print("|---|---|---|---|---|")
    for name, (train_s, predict_s) in rows.items():
        print(f"| {name} | {train_s * 1000:.0f} ms | {train_s / base_train:.2f} | "
              f"{predict_s * 1000:.1f} ms | {predict_s / base_predict:.2f} |")


if __name__ == "__main__":
    main()
