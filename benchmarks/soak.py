"""Soak test: 2,000 iterations of the ``digits`` preset with resident memory sampled.

    python benchmarks/soak.py [--iters 2000] [--data data/digits] [--out runs/soak]

Samples the resident set size of the training process and its data-loading workers every
second; reports memory after warm-up (10-20% of the run) against the end (last 10%) and
the growth in percent (target: under 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from o2f.config import SplitConfig, load_config
from o2f.data.digits import make_digits
from o2f.engine import train


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children, MiB (Linux /proc)."""
    total = 0.0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--data", default="data/digits")
    parser.add_argument("--out", default="runs/soak")
    args = parser.parse_args()
    data = Path(args.data)
    if not (data / "annotations" / "train.json").exists():
        make_digits(data, variant="sparse")
    cfg = load_config("digits")
    cfg.data.train = SplitConfig(str(data / "annotations/train.json"), str(data / "train"))
    cfg.data.val = cfg.data.train
    iters_per_epoch = 76
    cfg.train.epochs = args.iters // iters_per_epoch + 1
    cfg.train.max_iters, cfg.train.eval_every = args.iters, 0
    cfg.data.num_workers = 1  # a loading worker too: its memory is part of what is watched

    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.is_set():
            samples.append((time.perf_counter() - start, rss_mib(os.getpid())))
            done.wait(1.0)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    train(cfg, args.out)
    done.set()
    thread.join()
    duration = samples[-1][0]
    warm = [m for t, m in samples if 0.1 * duration <= t <= 0.2 * duration]
    end = [m for t, m in samples if t >= 0.9 * duration]
    result = {"iterations": args.iters, "seconds": duration,
              "rss_after_warmup_mib": statistics.median(warm),
              "rss_end_mib": statistics.median(end), "rss_max_mib": max(m for _, m in samples)}
    result["growth_percent"] = 100 * (result["rss_end_mib"] / result["rss_after_warmup_mib"] - 1)
    Path(args.out, "soak.json").write_text(json.dumps({**result, "samples": samples}))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
