"""Convert a checkpoint of the authors' MMDetection release to an o2f checkpoint.

The release's files hold ``state_dict`` and a ``meta`` entry whose pickle refers to mmcv
classes. We never unpickle those for real: the file's non-tensor globals are listed first
(``torch.serialization.get_unsafe_globals_in_checkpoint``) and every one of them is bound
to an inert stand-in class under ``weights_only=True``, so nothing the pickle names is
imported or called, whatever it is (a ``__reduce__`` payload included).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from o2f.config import Config, load_config


class StandIn:
    """Stands in for a class or function a checkpoint's pickle names. Creating or calling it
    yields an inert ``OrderedDict`` (one of the few containers the weights-only unpickler
    may fill and build) that records the name and arguments: nothing else happens."""

    stands_for = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        record: OrderedDict = OrderedDict()
        record.__dict__.update(stands_for=cls.stands_for, args=args, kwargs=kwargs)
        return record


# Globals that only an attack needs: refused outright rather than stood in for.
REFUSED = {"builtins.getattr", "builtins.eval", "builtins.exec", "builtins.compile",
           "builtins.__import__", "builtins.open", "builtins.setattr", "builtins.delattr"}


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"stands_for": name})


def safe_load(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """Load any torch checkpoint without running pickled code. Returns the object and the
    globals that were replaced by inert stand-ins. A file naming ``os``/``sys`` functions
    or :data:`REFUSED` builtins is refused outright."""
    path = str(path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    blocked = [n for n in unsafe if n.split(".")[0] in ("os", "posix", "nt", "sys")
               or n in REFUSED]
    if blocked:  # torch never lets the first through; the rest only serve code execution
        raise ValueError(f"{path}: refused: its pickle calls {', '.join(blocked)}, which no "
                         "checkpoint needs (a tampered file?)")
    with torch.serialization.safe_globals([(_stand_in(n), n) for n in unsafe]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj, unsafe


_RULES: list[tuple[str, str]] = [
    (r"^backbone\.conv1\.(.*)$", r"backbone.stem.0.\1"),
    (r"^backbone\.bn1\.(.*)$", r"backbone.stem.1.\1"),
    (r"^backbone\.(layer\d\..*)$", r"backbone.\1"),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.(.*)$", r"neck.fpn.inner_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.([0-2])\.conv\.(.*)$", r"neck.fpn.layer_blocks.\1.0.\2"),
    (r"^neck\.fpn_convs\.3\.conv\.(.*)$", r"neck.fpn.extra_blocks.p6.\1"),
    (r"^neck\.fpn_convs\.4\.conv\.(.*)$", r"neck.fpn.extra_blocks.p7.\1"),
    (r"^bbox_head\.conv_cls\.(.*)$", r"head.cls_out.\1"),
    (r"^bbox_head\.conv_reg\.(.*)$", r"head.reg_out.\1"),
    (r"^bbox_head\.conv_centerness\.(.*)$", r"head.obj_out.\1"),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
]
_TOWERS = {"cls_convs": "cls_tower", "reg_convs": "reg_tower", "centerness_convs": "obj_tower"}
_TOWER_KEY = re.compile(r"^bbox_head\.(cls_convs|reg_convs|centerness_convs)\.(\d+)\."
                        r"(conv|gn)\.(.*)$")


def map_key(key: str) -> str | None:
    """Our name of a release key, or None when it has no counterpart."""
    m = _TOWER_KEY.match(key)
    if m:
        tower, i, part, rest = m.groups()
        # each tower layer is (conv, GroupNorm, ReLU) in one Sequential
        return f"head.{_TOWERS[tower]}.{3 * int(i) + (part == 'gn')}.{rest}"
    for pattern, repl in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def convert_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(our state dict, release keys with no counterpart)."""
    out, unmatched = {}, []
    for key, value in state.items():
        new = map_key(key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value
    return out, unmatched


def convert_mmdet(src: str | Path, dst: str | Path, config: str | Config = "r50_1x"
                  ) -> dict[str, Any]:
    """Convert ``src`` (a release checkpoint) into ``dst`` (an o2f checkpoint for
    ``config``). Returns a report: replaced globals, unmatched and missing keys."""
    from o2f.checkpoint import load_weights, save_checkpoint
    from o2f.model.detector import O2F

    obj, replaced = safe_load(src)
    if not isinstance(obj, dict):
        raise ValueError(f"{src}: not an MMDetection checkpoint (no dict at the top)")
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not any(k.startswith("bbox_head.") for k in state):
        raise ValueError(f"{src}: no 'bbox_head.*' weights: not an O2F/FCOS release checkpoint")
    cfg = load_config(config) if isinstance(config, str) else config
    cfg.model.backbone_weights = None
    num_classes = state["bbox_head.conv_cls.weight"].shape[0]
    cfg.model.num_classes = num_classes
    ours, unmatched = convert_state_dict(state)
    model = O2F(cfg.model)
    own = model.state_dict()
    missing = [k for k in own if k not in ours]
    for key in missing:  # e.g. BN counters some mmcv versions drop
        if key.endswith("num_batches_tracked"):
            ours[key] = own[key]
    load_weights(model, ours, str(src))
    meta = obj.get("meta", {})
    classes = meta.get("CLASSES") if isinstance(meta, dict) else None
    save_checkpoint(dst, {"model": model.state_dict(), "config": cfg.to_dict(),
                          "class_names": [str(c) for c in classes] if classes else [],
                          "converted_from": str(src)})
    return {"replaced_globals": replaced, "unmatched_keys": unmatched,
            "filled_keys": [k for k in missing if k.endswith("num_batches_tracked")],
            "num_classes": num_classes}
