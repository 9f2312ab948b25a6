"""Data loading throughput against training step time for the ``digits`` preset.

    python benchmarks/data_speed.py [--data data/digits] [--batches 20] [--workers 0 1 2]

Loading must keep ahead of training: the figure to read is the ratio of the loader's
images/s (decode, augment, collate) to the training step's images/s on the same machine.
The step is timed in both memory layouts (``train.channels_last``), printing their ratio.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "annotations" / "train.json").exists():
        make_digits(data, variant="sparse")
    cfg = load_config("digits")
    cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
    dataset = build_dataset(cfg, "train")
    sizes = [(i["height"], i["width"]) for i in map(dataset.get_image_info, range(len(dataset)))]
    batches = epoch_batches(sizes, cfg.train.batch_size, 0, 0)[: args.batches]
    images_total = sum(len(b) for b in batches)

    for workers in args.workers:
        loader = DataLoader(EpochDataset(dataset, 0), batch_sampler=batches,
                            collate_fn=collate_train, num_workers=workers)
        start = time.perf_counter()
        for _ in loader:
            pass
        seconds = time.perf_counter() - start
        print(f"loading, {workers} workers: {images_total / seconds:7.1f} images/s")

    loader = DataLoader(EpochDataset(dataset, 0), batch_sampler=batches,
                        collate_fn=collate_train, num_workers=0)
    prepared = list(loader)
    step_seconds = {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = O2F(cfg.model).train()
        if layout == "channels_last":  # what train.channels_last=true does
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        for i, (images, image_sizes, targets) in enumerate(prepared):
            if i == 2:  # the first steps allocate and pick kernels
                start = time.perf_counter()
            losses = model(images, targets, image_sizes=image_sizes, t=0.4)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
        step_seconds[layout] = (time.perf_counter() - start) / (len(prepared) - 2)
        print(f"training step, {layout} (data in memory): "
              f"{cfg.train.batch_size / step_seconds[layout]:7.1f} images/s, "
              f"{step_seconds[layout] * 1e3:.0f} ms per batch of {cfg.train.batch_size}")
    print(f"channels_last / contiguous step time: "
          f"{step_seconds['channels_last'] / step_seconds['contiguous']:.2f}")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
