"""The ``o2f`` command line: ``o2f <command> --help`` for each command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import o2f

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def _add_config(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required,
                   help="preset name (r50_1x, digits, ...) or a YAML file")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.lr=0.02 train.epochs=24 "
                        "(several after one flag, or the flag repeated)")


# What to do when a preset's own data paths are missing.
_DIGITS_HINT = "generate the digits dataset with `o2f data digits --out data/digits`"
_COCO_HINT = ("lay COCO out under data/coco/ as the README shows, or point "
              "data.train / data.val at your own annotation file and image folder")
DATA_HINTS = {"digits": _DIGITS_HINT, "digits_instance": _DIGITS_HINT,
              "crowdhuman_r50": "put annotation_train.odgt, annotation_val.odgt and Images/ "
                                "under data/crowdhuman/ (see the README)"}


def _path_problem(path: Path, folder: bool | None) -> str | None:
    """None when ``path`` is a readable file (or a listable folder; ``folder=None``: either),
    else what is wrong."""
    if not path.exists():
        return "not found"
    if folder and not path.is_dir():
        return "not a folder"
    if folder is False and not path.is_file():
        return "not a file"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return "not readable (permission denied)"
    return None


def _annotation_folder_problem(path: Path, fmt: str) -> str | None:
    """None when the folder ``path`` holds annotations of a folder format (VOC, YOLO)."""
    from o2f.data import DatasetError
    from o2f.data.formats import detect_format

    if fmt in ("coco", "odgt", "csv"):
        return "not a file"
    if fmt:
        return None
    try:
        detect_format(path)
    except DatasetError:
        return "not a file, nor a folder of VOC or YOLO annotations"
    return None


def check_inputs(cfg: Any, splits: tuple[str, ...]) -> None:
    """Stop before any work when an input the config names is missing or unreadable: the
    splits' annotation file and image folder, and a local backbone weight file. The error
    is one line naming the path, the config key and what to do."""
    from o2f.checkpoint import CheckpointError
    from o2f.config import PRESETS
    from o2f.data import DatasetError

    preset = PRESETS[cfg.name]() if cfg.name in PRESETS else None
    for split in splits:
        part = getattr(cfg.data, split)
        # ann_file: a file (COCO, odgt, CSV, data.yaml) or a folder (VOC, YOLO labels)
        for key, folder in (("ann_file", None), ("img_dir", True)):
            value = getattr(part, key)
            problem = _path_problem(Path(value), folder) if value else None
            if problem is None and folder is None and Path(value).is_dir():
                problem = _annotation_folder_problem(Path(value), part.format or cfg.data.format)
            if problem is None:
                continue
            default = preset is not None and getattr(getattr(preset.data, split), key) == value
            hint = (DATA_HINTS.get(cfg.name, _COCO_HINT) if default
                    else f"check --set data.{split}.{key}=...")
            kind = "image folder" if folder else "annotation file"
            raise DatasetError(f"{value}: {kind} {problem} (data.{split}.{key}); {hint}")
    weights = cfg.model.backbone_weights
    if weights and (Path(weights).suffix in (".pth", ".pt") or os.sep in weights):
        problem = _path_problem(Path(weights), folder=False)
        if problem:
            raise CheckpointError(f"{weights}: backbone weights {problem} "
                                  "(model.backbone_weights; null trains from scratch)")


def cmd_train(args: argparse.Namespace) -> int:
    from o2f.config import load_config
    from o2f.engine import train

    cfg = load_config(args.config, args.overrides)
    check_inputs(cfg, ("train", "val") if cfg.train.eval_every > 0 else ("train",))
    work_dir = args.work_dir or f"runs/{cfg.name}"
    metrics = train(cfg, work_dir, resume=args.resume)
    if metrics:
        print(json.dumps(metrics, indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from o2f import distributed as du
    from o2f.checkpoint import model_from_checkpoint
    from o2f.config import load_config
    from o2f.data import build_dataset
    from o2f.deploy import load_backend
    from o2f.engine import evaluate
    from o2f.logs import setup_logging

    device = du.init_from_env()
    setup_logging(None)
    cfg = load_config(args.config, args.overrides) if args.config else None
    if Path(args.checkpoint).suffix in (".onnx", ".xml"):  # an exported graph
        if cfg is None:
            raise SystemExit("o2f eval: an exported graph needs --config (for the val split)")
        source: Any = args.checkpoint
    else:
        source, cfg, _ = model_from_checkpoint(args.checkpoint, cfg, device)
    check_inputs(cfg, ("val",))
    model = load_backend(args.backend, source, args.dtype, device=device)
    if args.tile:
        from o2f.tiling import TiledDetector

        model = TiledDetector(model, args.tile, args.overlap)
    dataset = build_dataset(cfg, "val")
    with torch.inference_mode():
        metrics = evaluate(model, dataset, cfg, device, results_out=args.results_out,
                           per_class=True)
    if du.is_main():
        print(json.dumps(metrics, indent=1))
        if args.metrics_out:
            Path(args.metrics_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.metrics_out).write_text(json.dumps(metrics, indent=1) + "\n")
    du.shutdown()
    return 0


def _input_paths(inputs: list[str]) -> tuple[list[Path], list[Path]]:
    """(images, videos) named by files, folders (images, searched recursively) and globs."""
    import glob

    from o2f.video import VIDEO_SUFFIXES

    images: list[Path] = []
    videos: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            images += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            (videos if p.suffix.lower() in VIDEO_SUFFIXES else images).append(p)
        elif glob.has_magic(item):
            matches = sorted(Path(f) for f in glob.glob(item, recursive=True))
            if not matches:
                raise SystemExit(f"o2f predict: {item}: no file matches")
            images += [f for f in matches if f.suffix.lower() in IMAGE_SUFFIXES]
            videos += [f for f in matches if f.suffix.lower() in VIDEO_SUFFIXES]
        else:
            raise SystemExit(f"o2f predict: {p}: no such file or folder")
    if not images and not videos:
        raise SystemExit("o2f predict: no images or videos found in " + ", ".join(inputs))
    return images, videos


def cmd_predict(args: argparse.Namespace) -> int:
    from o2f.predict import load_detector, predict_images, predict_video

    if bool(args.checkpoint) == bool(args.onnx):
        raise SystemExit("o2f predict: give exactly one of --checkpoint and --onnx")
    if args.overlap is not None and not args.tile:
        raise SystemExit("o2f predict: --overlap needs --tile")
    images, videos = _input_paths(args.inputs)
    model, names = load_detector(args.checkpoint, args.onnx, tile=args.tile,
                                 overlap=args.overlap, batch_size=args.batch_size,
                                 backend=args.backend, dtype=args.dtype)
    common = {"model": model, "class_names": names, "score_thresh": args.score_thresh,
              "batch_size": args.batch_size}
    if images:
        predict_images(images, args.out, **common)
        print(f"wrote {args.out}/detections.json and the pictures")
    for video in videos:
        s = predict_video(video, args.out, **common)
        print(f"{video}: {s['frames']} frames in {s['seconds']:.1f} s ({s['fps']:.1f} "
              f"frames/s); wrote {s['video']} and {s['jsonl']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from o2f.data.digits import make_digits

    paths = make_digits(args.out, variant=args.variant, seed=args.seed, num_train=args.train,
                        num_val=args.val, fmt=args.format, single_class=args.single_class)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from o2f.data.formats import convert

    report = convert(args.src, args.to, args.out, src_format=args.src_format,
                     img_dir=args.img_dir, split=args.split, images=args.images)
    print(f"read {args.src} ({report['format']}): {report['num_images']} images, "
          f"{report['num_boxes']} boxes, {len(report['classes'])} classes")
    print(f"wrote {report['annotations']} ({args.to}); images in {report['images']}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from o2f.data.check import check_dataset, format_summary

    report = check_dataset(args.data, args.out, img_dir=args.img_dir, fmt=args.format,
                           split=args.split, input_size=tuple(args.input_size),
                           sheet_images=args.sheet)
    print(format_summary(report))
    if args.out:
        print(f"wrote {args.out}/check.json and the plots")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from o2f.checkpoint import model_from_checkpoint
    from o2f.export import export_onnx, onnx_ops

    if args.int8 != bool(args.calib):
        raise SystemExit("o2f export: --int8 needs --calib DIR (images to calibrate on), "
                         "and --calib needs --int8")
    if args.int8 and args.two_inputs:
        raise SystemExit("o2f export: --int8 covers the default one-input graph")
    model, _, ckpt = model_from_checkpoint(args.checkpoint)
    out = Path(args.out)
    float_graph = out if args.format == "onnx" and not args.int8 else Path(
        tempfile.mkdtemp(prefix="o2f-export-")) / "float32.onnx"
    path = export_onnx(model, float_graph, size=tuple(args.size), dynamic=args.dynamic,
                       class_names=ckpt.get("class_names"), two_inputs=args.two_inputs)
    if args.format == "onnx" and args.int8:
        from o2f.deploy.onnxruntime import quantize_int8

        path = quantize_int8(float_graph, out, args.calib)
    elif args.format == "openvino":
        from o2f.deploy import openvino

        path = (openvino.quantize_int8(float_graph, out, args.calib) if args.int8
                else openvino.save_ir(float_graph, out))
    inputs = ("images (normalised, padded), sizes" if args.two_inputs
              else "images (B x 3 x H x W RGB in [0, 1])")
    kind = f"{args.format}{' int8' if args.int8 else ''}"
    nms = ("none of them NMS" if path.suffix == ".xml"
           else f"{len(onnx_ops(path))} operator types, none of them NMS")
    print(f"wrote {path} ({kind}): inputs {inputs}; outputs boxes, scores, labels; {nms}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from o2f.convert import convert_mmdet

    report = convert_mmdet(args.mmdet, args.out, args.config)
    print(f"wrote {args.out} ({report['num_classes']} classes)")
    if report["replaced_globals"]:
        print("pickled objects not loaded (inert stand-ins): "
              + ", ".join(report["replaced_globals"]))
    if report["unmatched_keys"]:
        print(f"{len(report['unmatched_keys'])} keys of the file were not used: "
              + ", ".join(report["unmatched_keys"][:10]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from o2f.bench import format_report, run_bench
    from o2f.deploy import TORCH_BACKENDS
    from o2f.precision import dtype_name, parse_dtype

    dtypes = [d if d == "int8" else dtype_name(parse_dtype(d)) for d in args.dtype]
    # eager and onnxruntime float32 are always timed (their own rows)
    paths = [f"{b}:{d}" for b in args.backend for d in dict.fromkeys(dtypes)
             if (b, d) not in (("eager", "float32"), ("onnxruntime", "float32"))
             and not (b in TORCH_BACKENDS and d == "int8")
             and not (b == "onnxruntime" and d == "bf16")]
    report = run_bench(args.config, tuple(args.size), args.batch, args.repeats,
                       onnx=not args.no_onnx, fcos=not args.no_fcos, threads=args.threads,
                       paths=paths)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from o2f.demo import run_demo

    run_demo(args.out, data_dir=args.data, epochs=args.epochs, overrides=args.overrides)
    return 0


def _add_runtime(p: argparse.ArgumentParser, default_backend: str | None = "eager") -> None:
    from o2f.deploy import BACKENDS, backend_name

    p.add_argument("--dtype", type=str.lower, default="float32",
                   choices=["float32", "fp32", "bf16", "bfloat16"],
                   help="float32 (default) or bf16: bfloat16 autocast (eager) or inference "
                        "precision (openvino); fast where the CPU has AMX or AVX512-BF16")
    p.add_argument("--backend", type=backend_name, choices=BACKENDS, default=default_backend,
                   help="eager (PyTorch, default), compiled (the same, torch.compile), "
                        "onnxruntime or openvino (these two "
                        "export a checkpoint on the fly, or run an exported graph)"
                   + ("" if default_backend else "; default eager, or onnxruntime for --onnx"))


def _add_tiling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tile", type=int, metavar="SIZE",
                   help="predict large images in SIZE x SIZE tiles, merged without NMS: "
                        "each tile keeps the detections whose box centre it owns")
    p.add_argument("--overlap", type=int, metavar="PIXELS",
                   help="least overlap of neighbouring tiles; at least the largest object "
                        "(default SIZE / 4, rounded up to a multiple of 8)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2f", description="One-to-Few label assignment for end-to-end dense detection.")
    parser.add_argument("--version", action="version", version=f"o2f {o2f.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a config (also under torchrun)")
    _add_config(p, required=True)
    p.add_argument("--work-dir", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the val split")
    _add_config(p, required=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--metrics-out", help="write the metrics JSON here")
    p.add_argument("--results-out", help="write the detections (COCO results JSON) here")
    _add_runtime(p)
    _add_tiling(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="detect objects in images; draw and save them")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="images, folders of images, globs (quoted) or video files")
    p.add_argument("--checkpoint", help="an o2f checkpoint (last.pt)")
    p.add_argument("--onnx", help="run an exported graph (o2f export) with onnxruntime")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-thresh", type=float, default=0.3,
                   help="draw and save detections above this score (default 0.3)")
    _add_tiling(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="frames (or tiles, with --tile) per forward pass (default 8)")
    _add_runtime(p, default_backend=None)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export an NMS-free ONNX graph")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1344], metavar=("H", "W"),
                   help="input size (default 800 1344; multiples of 32 with --two-inputs)")
    p.add_argument("--dynamic", action="store_true",
                   help="free batch, height and width (what `o2f predict --onnx` needs "
                        "for images of any size)")
    p.add_argument("--two-inputs", action="store_true",
                   help="the earlier graph form: a normalised, padded batch and its sizes "
                        "(default: one input, images in [0, 1])")
    p.add_argument("--format", choices=["onnx", "openvino"], default="onnx",
                   help="onnx (default, float32) or openvino (IR: OUT.xml and OUT.bin)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 post-training quantisation (onnx: QDQ for onnxruntime; "
                        "openvino: the same QDQ graph as IR), calibrated on --calib")
    p.add_argument("--calib", metavar="DIR", help="folder of images to calibrate int8 on")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("convert", help="convert a checkpoint of the authors' release")
    p.add_argument("--mmdet", required=True, help="the release's .pth file")
    p.add_argument("--out", required=True, help="the o2f checkpoint to write")
    p.add_argument("--config", default="r50_1x",
                   help="the preset it was trained with (default r50_1x)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("bench", help="latency / throughput next to torchvision's FCOS")
    from o2f.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="built-in datasets, format conversion, data checks")
    dsub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    d = dsub.add_parser("digits", help="handwritten digits pasted on textured canvases")
    d.add_argument("--out", required=True)
    d.add_argument("--variant", choices=["sparse", "crowd"], default="sparse")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train", type=int, default=None, help="number of training images")
    d.add_argument("--val", type=int, default=None, help="number of validation images")
    d.add_argument("--format", choices=["coco", "odgt"], default="coco")
    d.add_argument("--single-class", action="store_true",
                   help="one category 'digit' instead of ten")
    d.set_defaults(func=cmd_data)

    from o2f.data.formats import FORMATS, WRITABLE

    d = dsub.add_parser("convert", help="convert annotations between formats")
    d.add_argument("src", metavar="SRC",
                   help="annotation file or folder (COCO .json, .odgt, VOC Annotations/ or "
                        "ImageSets split file, YOLO data.yaml or labels/, .csv)")
    d.add_argument("--from", dest="src_format", choices=FORMATS,
                   help="the source format (default: told from SRC)")
    d.add_argument("--to", required=True, choices=WRITABLE)
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--img-dir", help="the source's image folder (default: the format's "
                                     "usual place)")
    d.add_argument("--split", help="split name of the output (and of a data.yaml to read; "
                                   "default: train for a data.yaml, else SRC's name)")
    d.add_argument("--images", choices=["link", "copy", "none"], default="link",
                   help="put the images where the output layout expects them as symbolic "
                        "links (default), copies, or not at all")
    d.set_defaults(func=cmd_data_convert)

    d = dsub.add_parser("check", help="statistics, problems and pictures of a dataset")
    d.add_argument("data", metavar="DATA", help="annotation file or folder (any format)")
    d.add_argument("--out", help="folder for check.json, the plots and the contact sheet")
    d.add_argument("--img-dir", help="the image folder (default: the format's usual place)")
    d.add_argument("--format", choices=FORMATS, help="default: told from DATA")
    d.add_argument("--split", default="train", help="split of a YOLO data.yaml")
    d.add_argument("--input-size", type=int, nargs=2, default=[800, 1333],
                   metavar=("SHORT", "LONG"),
                   help="the model's input size, to place objects on FPN levels "
                        "(default 800 1333; 0 0 for native size)")
    d.add_argument("--sheet", type=int, default=12,
                   help="images on the contact sheet (default 12)")
    d.set_defaults(func=cmd_data_check)

    from o2f.demo import DEMO_EPOCHS  # light: the demo module imports torch lazily

    p = sub.add_parser("demo", help="the built-in CPU demo (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--data", default="data/digits", help="where the dataset is generated")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                   help=f"training epochs (default {DEMO_EPOCHS}; 8 reach a higher AP)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[],
                   metavar="KEY=VALUE", help="override keys of the digits preset")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from o2f.checkpoint import CheckpointError
    from o2f.config import ConfigError
    from o2f.data.coco import DatasetError
    from o2f.engine import NonFiniteLossError, OutOfMemoryHint
    from o2f.video import FrameError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, NonFiniteLossError,
            OutOfMemoryHint, FrameError) as e:
        print(f"o2f {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        # an input no check above names: still one line, naming the path
        print(f"o2f {args.command}: error: {e.filename or ''}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"o2f {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
