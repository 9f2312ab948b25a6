"""Data loading throughput against training step time for the ``digits`` preset.

    python benchmarks/data_speed.py [--data data/digits] [--batches 20] [--workers 0 1 2]

Loading must keep ahead of training: the figure to read is the ratio of the loader's
images/s (decode, augment, collate) to the training step's images/s on the same machine.
The step is timed in both memory layouts (``train.channels_last``), printing their ratio,
then in float32 and under bfloat16 autocast (``train.amp``: what ``auto`` picks on a CPU with
bfloat16 units), printing the speed-up, and the whole loop (loading included) for each
number of workers against the step alone.

    python benchmarks/data_speed.py --amp-only   # the precision rows alone
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from o2f.config import SplitConfig, load_config
from o2f.data import build_dataset, collate_train
from o2f.data.digits import make_digits
from o2f.engine import EpochDataset, build_optimizer, epoch_batches
from o2f.model.detector import O2F
from o2f.precision import autocast, cpu_features, resolve_amp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--amp-only", action="store_true",
                        help="time only the training step in float32 and bfloat16 autocast")
    args = parser.parse_args()
    if args.batches < 3:
        parser.error("--batches must be at least 3 (the first two steps are not timed)")
    data = Path(args.data)
    if not (data / "annotations" / "train.json").exists():
        make_digits(data, variant="sparse")
    cfg = load_config("digits")
    cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
    dataset = build_dataset(cfg, "train")
    sizes = [(i["height"], i["width"]) for i in map(dataset.get_image_info, range(len(dataset)))]
    batches = epoch_batches(sizes, cfg.train.batch_size, 0, 0)[: args.batches]
    images_total = sum(len(b) for b in batches)

    def loader(workers: int) -> DataLoader:
        return DataLoader(EpochDataset(dataset, 0), batch_sampler=batches,
                          collate_fn=collate_train, num_workers=workers)

    for workers in [] if args.amp_only else args.workers:
        start = time.perf_counter()
        for _ in loader(workers):
            pass
        seconds = time.perf_counter() - start
        print(f"loading, {workers} workers: {images_total / seconds:7.1f} images/s")

    def train_seconds(batches_of, channels_last: bool,
                      amp: torch.dtype | None = None) -> float:
        """Seconds per training step over ``batches_of`` (the first two steps not timed:
        they allocate and pick kernels), under ``amp`` autocast as the training loop runs it."""
        torch.manual_seed(0)
        model = O2F(cfg.model).train()
        if channels_last:  # what train.channels_last=true does
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        for i, (images, image_sizes, targets) in enumerate(batches_of):
            if i == 2:
                start = time.perf_counter()
            with autocast("cpu", amp):
                losses = model(images, targets, image_sizes=image_sizes, t=0.4)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        return (time.perf_counter() - start) / (len(batches) - 2)

    def report(what: str, seconds: float) -> None:
        print(f"{what}: {cfg.train.batch_size / seconds:7.1f} images/s, "
              f"{seconds * 1e3:.0f} ms per batch of {cfg.train.batch_size}")

    prepared = list(loader(0))
    print(f"CPU: {cpu_features().describe()}; train.amp=auto picks "
          f"{resolve_amp('auto', 'cpu') or 'float32'}")
    # Alternated twice, so a change of machine load during the run shows as disagreement.
    amp_steps: dict[str, list[float]] = {"float32": [], "bf16": []}
    for _ in range(2):
        amp_steps["float32"].append(train_seconds(prepared, cfg.train.channels_last))
        amp_steps["bf16"].append(train_seconds(prepared, cfg.train.channels_last, torch.bfloat16))
    for name, seconds in amp_steps.items():
        report(f"training step, {name}{' autocast' if name == 'bf16' else ''} (data in memory)",
               min(seconds))
    ratios = [f / b for f, b in zip(amp_steps["float32"], amp_steps["bf16"], strict=True)]
    print(f"bf16 autocast / float32 training speed: "
          f"{min(amp_steps['float32']) / min(amp_steps['bf16']):.2f}x "
          f"(per alternation: {', '.join(f'{r:.2f}' for r in ratios)})")
    if args.amp_only:
        return
    step = {}
    for channels_last in (False, True):
        step[channels_last] = train_seconds(prepared, channels_last)
        report(f"training step, {'channels_last' if channels_last else 'contiguous'} "
               "(data in memory)", step[channels_last])
    print(f"channels_last / contiguous step time: {step[True] / step[False]:.2f}")

    # The whole loop: loading workers share the two cores with the compute threads.
    loop = {}
    for workers in args.workers:
        loop[workers] = train_seconds(loader(workers), cfg.train.channels_last)
        report(f"training loop with loading, {workers} workers", loop[workers])
    for workers in args.workers:
        print(f"loop time, {workers} workers / in memory: "
              f"{loop[workers] / step[cfg.train.channels_last]:.2f}")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
