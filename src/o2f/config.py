"""Configuration: plain dataclasses, presets by name, YAML files and ``--set a.b=value``.

A config is a :class:`Config` with three parts: ``model`` (what is built), ``data`` (what is
read and how it is augmented) and ``train`` (the optimisation recipe). Presets are small
functions in :data:`PRESETS`; a YAML file may name a preset in ``base:`` and override any
key. Every key is checked: an unknown one is an error that lists the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # resnet18/34/50/101, swin_t, or "digits_cnn" (the CPU demo)
    backbone_weights: str | None = None  # a torchvision weight enum name or a .pth path
    frozen_stages: int = 1  # stem + stage 1 frozen when initialised from ImageNet weights
    norm_eval: bool | None = None  # BN in eval mode; None = "when backbone_weights is set"
    num_classes: int = 80
    fpn_channels: int = 256
    num_levels: int = 5  # P3-P7; 3 gives P3-P5
    head_channels: int = 256
    head_convs: int = 4
    obj_channels: int = 64
    obj_convs: int = 3
    # one-to-few assignment (docs/algorithm.md section 2)
    assign: str = "o2f"  # o2f | o2o | o2m | poto (DeFCN) | dual (YOLOv10)
    # A named bundle of the keys below (RECIPES): setting it sets them; keys set after it
    # win. Kept before them, so a saved config reloads with its own later overrides.
    recipe: str = "release"  # release | strict-e2e (docs/ablation.md, "End to end in fact")
    o2f_topk: int = 7
    alpha: float = 0.8
    radius: float = 1.5
    soft_weight: float = 0.4
    soft_weight_end: float | None = None  # None: constant; else the weight follows t to this
    soft_weight_from: float = 0.0  # share of t's fall before the weight starts to move
    soft_weight_top: float | None = None  # a soft anchor outscoring its gt's other picks
    # soft anchors scoring under the cap keep soft_weight; the scheduled weight is for those
    # at or above it (None: for every soft anchor, the release)
    soft_cap: float | None = None
    soft_push: str = "joint"  # joint (release) | obj: soft anchors pushed down via objectness
    t_start: float = 0.6
    t_end: float = 0.2
    # Levers for duplicate removal (docs/ablation.md, "End to end in fact"); the defaults
    # are the release's recipe.
    t_schedule: str = "epoch"  # epoch: linear by epoch (release) | iter: by iteration
    t_end_at: float = 1.0  # iter schedule: fraction of training where t reaches t_end, held
    o2o_from: float = 1.0  # fraction of training from which soft anchors are negatives (k=1)
    max_filter: bool = False  # DeFCN's 3D max filter on the objectness branch (in the graph)
    box_vote: bool = False  # each cell's box a learnt mean of its 3x3 neighbours' (in the graph)
    # the top-k rescored by a learnt relation network over overlapping detections (in the
    # graph; o2f.model.rescore), trained beside the detector with this loss weight
    rescore: bool = False
    rescore_weight: float = 1.0
    # share of its score a detection the rescorer calls a repeat keeps: low enough to stay
    # under the 0.3 a picture is drawn at, like the release's soft anchors (t ends at 0.2),
    # and still there as a second chance for the metrics
    rescore_floor: float = 0.2
    # quality (release) | score | iou | leader | centred | centred_in_level
    certain_by: str = "quality"
    certain_margin: float = 0.05  # certain_by=leader: picks this near the best quality compete
    rank_weight: float = 0.0  # >0: per gt, softmax CE making the certain positive the peak
    certain_weight: float = 1.0  # loss weight of each certain positive (release: 1)
    certain_box_weight: float = 1.0  # x the certain positive's box-loss weight (release: 1)
    certain_label: str = "one"  # one (release) | iou: the certain positive's label is its IoU
    poto_aux: bool = False  # assign=poto: DeFCN's auxiliary one-to-many loss (loss_cls_aux)
    # assign=o2f: "release" adds a training-only second head branch trained with the
    # release's recipe while the inference branch, on detached features, follows the keys
    # above (YOLOv10's dual branches, one-to-few on both); "" (the release): one branch
    aux_branch: str = ""
    reg_weight: float = 2.0
    ignore_mode: str = "drop"  # drop: ignore regions are negatives; exclude: out of the loss
    # inference (docs/algorithm.md section 4)
    score_thresh: float = 0.05
    pre_topk: int = 1000
    topk: int = 100  # detections per image
    nms: bool | None = None  # None: on for o2m only
    nms_iou: float = 0.6
    # resizing done inside the model (the list-of-images API)
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    # instance segmentation (CondInst + O2F, docs/algorithm.md section 7; used when task="instance")
    task: str = "detection"  # detection | instance
    mask_channels: int = 128  # width of the mask branch's convs
    mask_convs: int = 4  # 3x3 conv-BN-ReLU layers of the mask branch after the fusion
    mask_in_levels: int = 3  # FPN levels fused into the P3 mask branch (the release: P3-P5)
    mask_bases: int = 8  # channels of the mask features the dynamic head reads
    dynamic_channels: int = 8  # width of the 3 dynamic 1x1 convs (8: 169 parameters per point)
    mask_weight: float = 2.0  # Dice loss weight
    mask_max_pos: int = 0  # most positives per image in the mask loss (0: all of them)
    mask_thresh: float = 0.5  # probability above which an output pixel is in the mask

    @property
    def use_nms(self) -> bool:
        return self.assign == "o2m" if self.nms is None else bool(self.nms)


# model.recipe: what each name sets. "release" is the authors' recipe (every preset's
# default); "strict-e2e" is the measured recipe with the fewest duplicates left for NMS
# (docs/ablation.md, "End to end in fact"): the soft anchors turn into plain negatives by
# the end (t -> 0) and, from half of t's fall on, weigh up to 3x a certain positive.
RECIPES: dict[str, dict[str, Any]] = {
    "release": {"t_end": 0.2, "soft_weight_end": None, "soft_weight_from": 0.0},
    "strict-e2e": {"t_end": 0.0, "soft_weight_end": 3.0, "soft_weight_from": 0.5},
}


@dataclass
class SplitConfig:
    ann_file: str = ""
    img_dir: str = ""
    format: str = ""  # coco | odgt | voc | yolo | csv; "" = data.format, else from the path


@dataclass
class DataConfig:
    format: str = ""  # both splits' format (coco | odgt | voc | yolo | csv); "" = detect
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    min_size: list[int] = field(default_factory=lambda: [800, 800])  # train short side range
    max_size: int = 1333
    flip: bool = True
    num_workers: int = 2
    check_images: bool = True


@dataclass
class TrainConfig:
    epochs: int = 12
    batch_size: int = 16  # total over all processes
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # at base_batch_size images per step; scaled linearly
    base_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 1000
    warmup_ratio: float = 0.001
    schedule: str = "step"  # step | cosine | constant
    # model.rescore: the rescorer's own lr schedule (constant: held after the warm-up, as it
    # learns the detector's scores as they end; "" = train.schedule) and its lr as a
    # multiple of the detector's base lr (docs/ablation.md, "End to end in fact")
    rescore_schedule: str = "constant"
    rescore_lr_mult: float = 3.0
    steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs where lr *= 0.1
    grad_clip: float | None = None
    amp: str = "auto"  # auto | bf16 | fp16 | off; auto: bf16 where the CPU/GPU runs it natively
    channels_last: bool = True  # NHWC weights and activations: faster convolutions
    eval_every: int = 1
    seed: int = 0
    log_every: int = 20
    skip_nonfinite: bool = False
    sync_bn: bool = False
    max_iters: int | None = None  # stop early (smoke tests, benchmarks)
    ckpt_every: int = 0  # also write last.pt every N iterations (0: at epoch ends only)
    eval_batch_size: int = 1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str = "custom"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- presets

def _coco(cfg: Config) -> Config:
    cfg.data.train = SplitConfig("data/coco/annotations/instances_train2017.json",
                                 "data/coco/train2017")
    cfg.data.val = SplitConfig("data/coco/annotations/instances_val2017.json",
                               "data/coco/val2017")
    cfg.model.backbone_weights = "IMAGENET1K_V1"
    return cfg


def r50_1x() -> Config:
    return _coco(Config(name="r50_1x"))


def r50_3x_ms() -> Config:
    cfg = _coco(Config(name="r50_3x_ms"))
    cfg.data.min_size = [640, 800]
    cfg.train.epochs, cfg.train.steps = 36, [24, 33]
    return cfg


def r101_1x() -> Config:
    cfg = r50_1x()
    cfg.name, cfg.model.backbone = "r101_1x", "resnet101"
    return cfg


def r101_3x_ms() -> Config:
    cfg = r50_3x_ms()
    cfg.name, cfg.model.backbone = "r101_3x_ms", "resnet101"
    return cfg


def swin_1x() -> Config:
    cfg = r50_1x()
    cfg.name, cfg.model.backbone = "swin_1x", "swin_t"
    cfg.model.backbone_weights = None  # timm weights need a download: pass a path
    return cfg


def swin_3x() -> Config:
    cfg = r50_3x_ms()
    cfg.name, cfg.model.backbone = "swin_3x", "swin_t"
    cfg.model.backbone_weights = None
    return cfg


def crowdhuman_r50() -> Config:
    cfg = Config(name="crowdhuman_r50")
    cfg.model.backbone_weights = "IMAGENET1K_V1"
    cfg.model.num_classes = 1
    cfg.model.o2f_topk = 4
    cfg.model.topk = 500
    cfg.model.pre_topk = 5000
    cfg.model.min_size, cfg.model.max_size = 800, 1400
    cfg.data.format = "odgt"
    cfg.data.train = SplitConfig("data/crowdhuman/annotation_train.odgt",
                                 "data/crowdhuman/Images")
    cfg.data.val = SplitConfig("data/crowdhuman/annotation_val.odgt", "data/crowdhuman/Images")
    cfg.data.min_size, cfg.data.max_size = [480, 960], 1400
    cfg.train.optimizer, cfg.train.lr = "adamw", 4e-5
    cfg.train.epochs, cfg.train.steps = 50, [40]
    return cfg


def condinst_r50_1x() -> Config:
    cfg = r50_1x()
    cfg.name, cfg.model.task = "condinst_r50_1x", "instance"
    cfg.model.reg_weight = 1.0
    return cfg


def condinst_r50_3x_ms() -> Config:
    cfg = r50_3x_ms()
    cfg.name, cfg.model.task = "condinst_r50_3x_ms", "instance"
    cfg.model.reg_weight = 1.0
    return cfg


def digits() -> Config:
    """The CPU demo: a 0.8M-parameter CNN on the built-in handwritten-digits dataset."""
    cfg = Config(name="digits")
    m = cfg.model
    m.backbone, m.backbone_weights, m.num_classes = "digits_cnn", None, 10
    m.fpn_channels = m.head_channels = 64
    m.num_levels, m.head_convs = 3, 2
    m.obj_channels, m.obj_convs = 32, 1
    m.min_size, m.max_size = 0, 0  # native size: canvases are 256-384 px
    # the learnt rescoring of the top-k: on the crowd digits the recipe that leaves NMS
    # nothing to add at no AP cost (docs/ablation.md, "End to end in fact")
    m.rescore = True
    cfg.data.train = SplitConfig("data/digits/annotations/train.json", "data/digits/train")
    cfg.data.val = SplitConfig("data/digits/annotations/val.json", "data/digits/val")
    cfg.data.min_size, cfg.data.max_size, cfg.data.flip = [0, 0], 0, False  # native size
    # On two cores a loading worker slows the two compute threads more than decoding in
    # the training process does (benchmarks/data_speed.py).
    cfg.data.num_workers = 0
    t = cfg.train
    t.optimizer, t.lr, t.base_batch_size, t.batch_size = "adamw", 2e-3, 8, 8
    t.weight_decay, t.warmup_iters, t.warmup_ratio = 0.05, 100, 0.01
    t.schedule, t.epochs, t.steps, t.eval_every = "cosine", 8, [], 2
    t.eval_batch_size, t.log_every = 8, 10
    return cfg


def digits_instance() -> Config:
    """The CPU demo with masks (CondInst): the digits preset plus a thin mask branch."""
    cfg = digits()
    cfg.name, cfg.model.task, cfg.model.reg_weight = "digits_instance", "instance", 1.0
    cfg.model.mask_channels = 64
    cfg.model.rescore = False  # measured on boxes only; masks keep the release's path
    return cfg


PRESETS = {f.__name__: f for f in (r50_1x, r50_3x_ms, r101_1x, r101_3x_ms, swin_1x, swin_3x,
                                    crowdhuman_r50, condinst_r50_1x, condinst_r50_3x_ms,
                                    digits, digits_instance)}


# --------------------------------------------------------------------------- overrides

class ConfigError(ValueError):
    """A config file or override names an unknown key or an invalid value."""


def valid_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """All dotted keys of a config (leaves only)."""
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += valid_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    hint = f"; closest valid keys: {', '.join(close)}" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _field_type(obj: Any, name: str) -> tuple[type, bool]:
    """(the documented type of a dataclass field, whether None is allowed), read from its
    annotation (``int | None`` gives ``(int, True)``; ``list[int]`` gives ``(list, False)``)."""
    hint = typing.get_type_hints(type(obj))[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    base = args[0] if optional else hint
    return typing.get_origin(base) or base, optional


# String keys that older configs (or YAML's reading of "off") give as booleans.
_BOOL_SPELLINGS = {"train.amp": {True: "auto", False: "off"}}


def _coerce(value: Any, kind: type, optional: bool, key: str, source: str) -> Any:
    """Convert a YAML-parsed value to the field's documented type, or raise ConfigError.
    ``None`` (``null`` in YAML) is accepted only where the field allows it."""
    expected = kind.__name__ + (" or null" if optional else "")
    error = ConfigError(f"{source}: '{key}' expects a {expected}, got {value!r}")
    if value is None:
        if optional:
            return None
        raise error
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise error
    if kind is int:
        if isinstance(value, bool):
            raise error
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise error
    if kind is float:
        if isinstance(value, bool):
            raise error
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise error from None
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and key in _BOOL_SPELLINGS:  # YAML reads off/on as booleans
            return _BOOL_SPELLINGS[key][value]
        raise error
    if kind is list:
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise error
        return [int(v) if isinstance(v, float) and v.is_integer() else v for v in items]
    return value


def set_key(cfg: Config, key: str, value: Any, source: str = "--set") -> None:
    """Set one dotted key (``train.lr``), converting ``value`` to the field's type."""
    *parents, leaf = key.split(".")
    obj: Any = cfg
    for part in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise _unknown(key, source)
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj) or leaf not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown(key, source)
    current = getattr(obj, leaf)
    if isinstance(obj, ModelConfig) and leaf == "recipe":
        if value not in RECIPES:
            raise ConfigError(f"{source}: '{key}' must be one of {', '.join(RECIPES)}, "
                              f"got {value!r}")
        for name, recipe_value in RECIPES[value].items():
            setattr(obj, name, recipe_value)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' is a section; set its keys instead")
        for k, v in value.items():
            set_key(cfg, f"{key}.{k}", v, source)
        return
    setattr(obj, leaf, _coerce(value, *_field_type(obj, leaf), key, source))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "data", "train", "val") or (
                isinstance(v, dict) and prefix):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_config(name_or_path: str, overrides: list[str] | None = None) -> Config:
    """A preset name or a YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    path = Path(name_or_path)
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    elif path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        base = raw.pop("base", None)
        if base is not None and base not in PRESETS:
            raise ConfigError(f"{path}: unknown base preset '{base}'; "
                              f"presets: {', '.join(PRESETS)}")
        cfg = PRESETS[base]() if base else Config()
        cfg.name = raw.pop("name", path.stem)
        for key, value in _flatten(raw).items():
            set_key(cfg, key, value, source=str(path))
    else:
        close = difflib.get_close_matches(name_or_path, list(PRESETS), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown preset or config file '{name_or_path}'{hint}; "
                          f"presets: {', '.join(PRESETS)}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, text = item.split("=", 1)
        set_key(cfg, key.strip(), yaml.safe_load(text) if text else "")
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint (unknown keys from other versions ignored)."""
    cfg = Config(name=d.get("name", "custom"))
    for key, value in _flatten({k: v for k, v in d.items() if k != "name"}).items():
        try:
            set_key(cfg, key, value, source="checkpoint")
        except ConfigError:
            pass
    return cfg
