"""The built-in CPU demo: generate the digits dataset, train the ``digits`` preset, evaluate
without NMS, and draw predictions and training curves."""

from __future__ import annotations

import json
import time
from pathlib import Path

from o2f.config import SplitConfig, load_config

# The demo's schedule: six epochs of the digits preset (whose eight are the ablation's 1x
# budget) reach about AP 0.65 in about five minutes of two cores; five epochs fall short
# in some runs (AP 0.32-0.59 over six runs), eight reach 0.75-0.77 (docs/benchmarks.md).
DEMO_EPOCHS = 6


def plot_curves(work_dir: Path, out_png: Path) -> None:
    """Loss (per logged iteration) and AP / AP50 (per evaluation) from a run's logs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    metrics_file = work_dir / "metrics.jsonl"
    metrics = ([json.loads(line) for line in metrics_file.read_text().splitlines()]
               if metrics_file.exists() else [])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [r["epoch"] for r in logs]
    for key in ("loss", "loss_cls", "loss_box"):
        ax1.plot(epochs, [r[key] for r in logs], label=key)
    ax1.set_xlabel("epoch")
    ax1.set_title("training loss")
    ax1.legend()
    if metrics:
        for key in ("AP", "AP50"):
            ax2.plot([m["epoch"] for m in metrics], [m[key] for m in metrics], "o-", label=key)
        ax2.set_ylim(0, 1)
    ax2.set_xlabel("epoch")
    ax2.set_title("val box AP, no NMS")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def run_demo(out: str | Path = "runs/demo", *, data_dir: str | Path = "data/digits",
             epochs: int = DEMO_EPOCHS, overrides: list[str] | None = None,
             num_pictures: int = 6) -> dict[str, float]:
    """Generate the sparse digits (once), train the ``digits`` preset for ``epochs`` (an
    override of ``train.epochs`` wins), evaluate without NMS, draw and print the results."""
    from o2f.data.digits import make_digits
    from o2f.engine import train
    from o2f.predict import predict_images

    out, data_dir = Path(out), Path(data_dir)
    start = time.perf_counter()
    if not (data_dir / "annotations" / "val.json").exists():
        print(f"generating the digits dataset in {data_dir} ...")
        make_digits(data_dir, variant="sparse", seed=0)
    cfg = load_config("digits", [f"train.epochs={epochs}", *(overrides or [])])
    cfg.data.train = SplitConfig(str(data_dir / "annotations/train.json"), str(data_dir / "train"))
    cfg.data.val = SplitConfig(str(data_dir / "annotations/val.json"), str(data_dir / "val"))
    if (out / "last.pt").exists():
        (out / "last.pt").unlink()  # a fresh run each time
    for name in ("metrics.jsonl", "log.jsonl"):
        (out / name).unlink(missing_ok=True)
    metrics = train(cfg, out)
    val_images = sorted((data_dir / "val").glob("*.png"))[:num_pictures]
    predict_images(val_images, out / "predictions", checkpoint=out / "last.pt")
    plot_curves(out, out / "curves.png")
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min: box AP {metrics.get('AP', 0):.3f}, "
          f"AP50 {metrics.get('AP50', 0):.3f} on the val split, without NMS")
    print(f"  predictions: {out / 'predictions'}/*.png")
    print(f"  curves:      {out / 'curves.png'}")
    print(f"  checkpoint:  {out / 'last.pt'} (try: o2f predict --checkpoint "
          f"{out / 'last.pt'} {data_dir / 'val'} --out {out / 'more'})")
    return metrics
