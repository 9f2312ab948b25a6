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
from o2f.precision import native_bf16


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32
                  ) -> float:
    """The machine's matmul speed (n x n by n x n) in ``dtype``, for context."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(timed(lambda: a @ b, repeats))
    return 2 * n**3 / best / 1e9


def conv_gflops(dtype: torch.dtype = torch.float32, repeats: int = 5,
                shape: tuple[int, int, int] = (256, 100, 152)) -> float:
    """The machine's 3x3 convolution speed in ``dtype``: C -> C channels on a C x H x W
    map, channels_last (a ResNet/FPN layer at 800 x 1216 input, stride 8)."""
    c, h, w = shape
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(dtype=dtype,
                                                          memory_format=torch.channels_last)
    x = torch.randn(1, c, h, w, dtype=dtype).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        best = min(timed(lambda: conv(x), repeats))
    return 2 * c * c * 9 * h * w / best / 1e9


def peaks(repeats: int = 3) -> dict[str, float | None]:
    """Measured float32 and bfloat16 matmul / conv speeds (GFLOP/s) of this machine. On a
    CPU without bfloat16 matrix units bfloat16 is emulated, slower than float32 and slow to
    time: its figures are None there, and float32 is the limit."""
    native, _ = native_bf16(torch.device("cpu"))
    return {"matmul_gflops": matmul_gflops(repeats=repeats),
            "matmul_bf16_gflops": matmul_gflops(repeats=repeats, dtype=torch.bfloat16)
            if native else None,
            "conv_gflops": conv_gflops(repeats=repeats),
            "conv_bf16_gflops": conv_gflops(torch.bfloat16, repeats=repeats)
            if native else None}


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
              threads: int | None = None, work_dir: str | Path = "runs/bench",
              paths: list[str] | None = None, overrides: list[str] | None = None) -> dict:
    """Latency of O2F eager float32 (and onnxruntime float32 with ``onnx``) beside
    torchvision FCOS float32 eager, plus every path of ``paths`` ("backend:dtype", dtype
    float32, bf16 or int8: e.g. "eager:bf16", "onnxruntime:int8", "openvino:bf16"), and
    the machine's measured float32 / bfloat16 peaks. Seconds are medians of ``repeats``.
    ``overrides``: ``key=value`` config overrides of the preset."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(preset, ["model.backbone_weights=null", *(overrides or [])])
    cfg.model.min_size, cfg.model.max_size = size[0], max(size)
    model = O2F(cfg.model).eval()
    _raise_scores(model.head.cls_out, prior)
    model.fuse_batchnorm()
    images = [torch.rand(3, *size) for _ in range(batch)]
    report: dict[str, Any] = {"preset": preset, "size": list(size), "batch": batch,
                              "threads": torch.get_num_threads(), **peaks(),
                              "cpu": _cpu_name(), "paths": {}}

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
    if paths:
        report["paths"] = time_paths(model, cfg, images, paths, Path(work_dir), repeats,
                                     threads)
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


def _cpu_name() -> str:
    from o2f.precision import cpu_features

    return cpu_features().describe()


def time_paths(model: O2F, cfg, images: list[torch.Tensor], paths: list[str], work_dir: Path,
               repeats: int, threads: int | None) -> dict[str, float]:
    """Median seconds of each "backend:dtype" path through :func:`o2f.deploy.load_backend`
    (graph backends read one fixed-size float32 export, or its int8 form calibrated on the
    benchmark's own images); a path whose runtime is missing is reported and skipped."""
    from o2f.deploy import TORCH_BACKENDS, MissingBackendError, backend_name, load_backend

    out: dict[str, float] = {}
    graph = None
    for item in paths:
        backend, _, dtype = item.partition(":")
        backend = backend_name(backend)
        dtype = dtype or "float32"
        try:
            source: Any = model
            if backend not in TORCH_BACKENDS:
                if graph is None:
                    graph = _fixed_graph(model, images, work_dir)
                source = graph
                if dtype == "int8":
                    source, dtype = _int8_graph(backend, graph, images, work_dir), "float32"
            predictor = load_backend(backend, source, dtype, threads=threads)
        except MissingBackendError as e:
            print(f"skipping {item}: {e}")
            continue
        out[item] = statistics.median(timed(lambda p=predictor: p(images), repeats))
    return out


def _fixed_graph(model: O2F, images: list[torch.Tensor], work_dir: Path) -> Path:
    from o2f.export import export_onnx

    size = tuple(-(-s // 32) * 32 for s in images[0].shape[-2:])
    return export_onnx(model, work_dir / f"o2f_{size[0]}x{size[1]}.onnx", size=size,
                       batch=len(images))


def _int8_graph(backend: str, graph: Path, images: list[torch.Tensor], work_dir: Path) -> Path:
    """The int8 form of ``graph`` for ``backend``, calibrated on ``images``."""
    from torchvision.utils import save_image

    calib = work_dir / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, calib / f"{i}.png")
    if backend == "openvino":
        from o2f.deploy.openvino import quantize_int8
    else:
        from o2f.deploy.onnxruntime import quantize_int8
    return quantize_int8(graph, work_dir / f"{graph.stem}_{backend}_int8.onnx", calib)


def format_report(r: dict) -> str:
    lines = [f"preset {r['preset']}, {r['size'][0]}x{r['size'][1]}, batch {r['batch']}, "
             f"{r['threads']} threads; {r.get('cpu', '')}",
             f"  measured peaks (GFLOP/s): matmul float32 {r['matmul_gflops']:.0f}"]
    if r.get("conv_bf16_gflops"):
        lines[-1] += (f", bf16 {r['matmul_bf16_gflops']:.0f}; 3x3 conv float32 "
                      f"{r['conv_gflops']:.0f}, bf16 {r['conv_bf16_gflops']:.0f}")
    elif "conv_gflops" in r:
        lines[-1] += (f"; 3x3 conv float32 {r['conv_gflops']:.0f}; bfloat16: no native "
                      "units on this CPU (emulated, not timed): float32 is the limit")

    def row(name: str, seconds: float, flops: float | None = None) -> str:
        ips = r["batch"] / seconds
        text = f"  {name:<26} {seconds * 1e3:9.1f} ms  {ips:6.2f} img/s"
        if flops:
            text += f"  {flops / 1e9:7.1f} GFLOP  {flops / seconds / 1e9:6.1f} GFLOP/s"
        return text

    lines.append(row("o2f eager (PyTorch)", r["o2f_eager_s"], r["o2f_flops"]))
    if "o2f_onnx_s" in r:
        lines.append(row("o2f onnxruntime", r["o2f_onnx_s"], r["o2f_flops"]))
    for name, seconds in r.get("paths", {}).items():
        lines.append(row(f"o2f {name}", seconds, r["o2f_flops"]))
    if "fcos_eager_s" in r:
        lines.append(row("torchvision FCOS eager", r["fcos_eager_s"], r["fcos_flops"]))
        lines.append(f"  post-processing: o2f {r['o2f_post_s'] * 1e3:.2f} ms "
                     f"({r['o2f_detections']} dets), FCOS {r['fcos_post_s'] * 1e3:.2f} ms "
                     f"({r['fcos_detections']} dets)")
        lines.append(f"  ratios vs FCOS eager: o2f eager {r['o2f_eager_s'] / r['fcos_eager_s']:.3f}"
                     + (f", o2f onnxruntime {r['o2f_onnx_s'] / r['fcos_eager_s']:.3f}"
                        if "o2f_onnx_s" in r else "")
                     + f", post-processing {r['o2f_post_s'] / r['fcos_post_s']:.3f}")
        if r.get("paths"):
            lines.append("  paths vs FCOS eager: " + ", ".join(
                f"{name} {s / r['fcos_eager_s']:.3f}" for name, s in r["paths"].items()))
    if "conv_gflops" in r:
        times = {"eager float32": r["o2f_eager_s"], **r.get("paths", {})}
        if "o2f_onnx_s" in r:
            times["onnxruntime float32"] = r["o2f_onnx_s"]
        name, best = min(times.items(), key=lambda kv: kv[1])
        achieved = r["o2f_flops"] / best / 1e9
        bf16 = (f"{achieved / r['conv_bf16_gflops']:.0%} of the bf16 conv peak, "
                if r.get("conv_bf16_gflops") else "")
        lines.append(f"  fastest o2f path: {name}, {achieved:.0f} GFLOP/s = {bf16}"
                     f"{achieved / r['conv_gflops']:.0%} of the float32 conv peak")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from o2f.deploy import BACKENDS, backend_name

    p.add_argument("--config", default="r50_1x", help="preset to time (default r50_1x)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-fcos", action="store_true")
    p.add_argument("--dtype", nargs="+", default=["float32"], type=str.lower,
                   choices=["float32", "fp32", "bf16", "bfloat16", "int8"],
                   help="precisions to time for each --backend (default float32; int8 "
                        "quantises the graph backends, calibrated on the benchmark images)")
    p.add_argument("--backend", nargs="+", default=["eager", "onnxruntime"],
                   type=backend_name, choices=list(BACKENDS),
                   help="runtimes to time (default eager onnxruntime; compiled: eager "
                        "with torch.compile, its compilation not timed)")
    p.add_argument("--json", help="also write the figures to this JSON file")
