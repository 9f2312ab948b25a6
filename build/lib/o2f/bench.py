"""``o2f bench``: latency and throughput of O2F (PyTorch eager and onnxruntime) next to
torchvision's FCOS, measured in the same process and run.

Both detectors get the same image size and the same kind of weights (random, with the
classification bias raised so that about as many boxes pass the score thresholds as with a
trained model: a freshly initialised FCOS passes none, which would make its NMS look free).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from o2f.config import load_config
from o2f.model.detector import O2F, preprocess_images


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """The machine's float32 matmul speed, for context."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n**3 / best / 1e9


def count_flops(model: nn.Module, *args: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(*args)
    return float(counter.get_total_flops())


def _raise_scores(cls_conv: nn.Conv2d, prior: float) -> None:
    nn.init.constant_(cls_conv.bias, float(torch.logit(torch.tensor(prior))))


def build_fcos(size: tuple[int, int], prior: float) -> nn.Module:
    import torchvision

    fcos = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=size[0],
        max_size=max(size)).eval()
    _raise_scores(fcos.head.classification_head.cls_logits, prior)
    return fcos


def fcos_postprocess_seconds(fcos: nn.Module, images: list[torch.Tensor], repeats: int
                             ) -> list[float]:
    """Time of torchvision FCOS's post-processing alone (decode, threshold, NMS, rescale)."""
    with torch.inference_mode():
        batch, _ = fcos.transform(images)
        feats = list(fcos.backbone(batch.tensors).values())
        head = fcos.head(feats)
        anchors = fcos.anchor_generator(batch, feats)
        counts = [f.shape[2] * f.shape[3] for f in feats]
        split_head = {k: list(v.split(counts, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(counts)) for a in anchors]
        original = [tuple(img.shape[-2:]) for img in images]

        def post():
            dets = fcos.postprocess_detections(split_head, split_anchors, batch.image_sizes)
            return fcos.transform.postprocess(dets, batch.image_sizes, original)

        return timed(post, repeats)


def o2f_postprocess_seconds(model: O2F, images: list[torch.Tensor], repeats: int
                            ) -> list[float]:
    """Time of O2F's post-processing alone (decode, top-k, rescale)."""
    with torch.inference_mode():
        batch, sizes, factor = preprocess_images(
            images, min_size=model.cfg.min_size, max_size=model.cfg.max_size)
        out = model.forward_dense(batch)

        def post():
            boxes, scores, labels = model.postprocess(out, sizes)
            keep = scores > model.cfg.score_thresh
            return [(b[k] / f.repeat(2), s[k], lab[k]) for b, s, lab, k, f in
                    zip(boxes, scores, labels, keep, factor, strict=True)]

        return timed(post, repeats)


def run_bench(preset: str = "r50_1x", size: tuple[int, int] = (800, 1216), batch: int = 1,
              repeats: int = 5, onnx: bool = True, fcos: bool = True, prior: float = 0.05,
              threads: int | None = None, work_dir: str | Path = "runs/bench") -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(preset, ["model.backbone_weights=null"])
    cfg.model.min_size, cfg.model.max_size = size[0], max(size)
    model = O2F(cfg.model).eval()
    _raise_scores(model.head.cls_out, prior)
    model.fuse_batchnorm()
    images = [torch.rand(3, *size) for _ in range(batch)]
    report: dict[str, Any] = {"preset": preset, "size": list(size), "batch": batch,
                              "threads": torch.get_num_threads(),
                              "matmul_gflops": matmul_gflops()}

    def run_o2f():
        with torch.inference_mode():
            return model(images)

    t = timed(run_o2f, repeats)
    report["o2f_eager_s"] = statistics.median(t)
    report["o2f_flops"] = count_flops(model, images)
    report["o2f_post_s"] = statistics.median(o2f_postprocess_seconds(model, images, repeats))
    report["o2f_detections"] = int(sum(len(d["boxes"]) for d in run_o2f()))
    if onnx:
        from o2f.export import OnnxDetector, export_onnx

        path = Path(work_dir) / f"{preset}_{size[0]}x{size[1]}.onnx"
        padded = tuple(-(-s // 32) * 32 for s in size)
        export_onnx(model, path, size=padded, batch=batch)
        detector = OnnxDetector(path, cfg.model, threads=threads)
        report["o2f_onnx_s"] = statistics.median(timed(lambda: detector(images), repeats))
    if fcos:
        tv = build_fcos(size, prior)

        def run_fcos():
            with torch.inference_mode():
                return tv(images)

        report["fcos_eager_s"] = statistics.median(timed(run_fcos, repeats))
        report["fcos_flops"] = count_flops(tv, images)
        report["fcos_post_s"] = statistics.median(fcos_postprocess_seconds(tv, images, repeats))
        report["fcos_detections"] = int(sum(len(d["boxes"]) for d in run_fcos()))
    return report


def format_report(r: dict) -> str:
    lines = [f"preset {r['preset']}, {r['size'][0]}x{r['size'][1]}, batch {r['batch']}, "
             f"{r['threads']} threads; machine matmul {r['matmul_gflops']:.0f} GFLOP/s"]

    def row(name: str, seconds: float, flops: float | None = None) -> str:
        ips = r["batch"] / seconds
        text = f"  {name:<26} {seconds * 1e3:9.1f} ms  {ips:6.2f} img/s"
        if flops:
            text += f"  {flops / 1e9:7.1f} GFLOP  {flops / seconds / 1e9:6.1f} GFLOP/s"
        return text

    lines.append(row("o2f eager (PyTorch)", r["o2f_eager_s"], r["o2f_flops"]))
    if "o2f_onnx_s" in r:
        lines.append(row("o2f onnxruntime", r["o2f_onnx_s"], r["o2f_flops"]))
    if "fcos_eager_s" in r:
        lines.append(row("torchvision FCOS eager", r["fcos_eager_s"], r["fcos_flops"]))
        lines.append(f"  post-processing: o2f {r['o2f_post_s'] * 1e3:.2f} ms "
                     f"({r['o2f_detections']} dets), FCOS {r['fcos_post_s'] * 1e3:.2f} ms "
                     f"({r['fcos_detections']} dets)")
        lines.append(f"  ratios vs FCOS eager: o2f eager {r['o2f_eager_s'] / r['fcos_eager_s']:.3f}"
                     + (f", o2f onnxruntime {r['o2f_onnx_s'] / r['fcos_eager_s']:.3f}"
                        if "o2f_onnx_s" in r else "")
                     + f", post-processing {r['o2f_post_s'] / r['fcos_post_s']:.3f}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="r50_1x", help="preset to time (default r50_1x)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-fcos", action="store_true")
    p.add_argument("--json", help="also write the figures to this JSON file")
