"""Checkpoints: writing, reading and fitting them to a model.

A checkpoint is a ``torch.save``'d dict of tensors and plain containers (readable with
``weights_only=True``). Training writes ``last.pt`` with:

- ``model``: the network's state dict;
- ``optimizer``: the optimiser's state dict;
- ``state``: where training is (epoch, iter_in_epoch, global_iter, skipped_nonfinite,
  replaced_images), so a resumed run skips the batches already done;
- ``rng``: the torch, Python and NumPy generators (and CUDA's when present), see
  :func:`rng_state`;
- ``config``: the full configuration as a dict, so the model can be rebuilt from the file;
- ``scaler``: the float16 loss scaler, only when it is enabled;
- ``class_names`` and ``cat_ids``: the training set's classes and their dataset ids.

Only ``model`` is required; a converted release checkpoint holds ``model``, ``config``,
``class_names`` and ``converted_from``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from o2f.config import Config, config_from_dict
from o2f.model.detector import O2F, create_model


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over
    ``path``, so an interruption leaves the previous checkpoint whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers, never pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or unsafe pickled objects
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an o2f checkpoint (no 'model' entry); "
                              "for the authors' MMDetection files use `o2f convert`")
    return ckpt


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load whose error says which keys are missing or unexpected and which shapes
    differ (e.g. a checkpoint trained on another number of classes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:5])
                         + (f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""))
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:5])}"
                         + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source}: checkpoint does not fit the model: "
                              + " | ".join(parts))
    model.load_state_dict(state)


def model_from_checkpoint(path: str | Path, cfg: Config | None = None,
                          device: torch.device | str = "cpu") -> tuple[O2F, Config, dict]:
    """Rebuild the model a checkpoint was trained with (or ``cfg``'s) and load it."""
    ckpt = load_checkpoint(path)
    if cfg is None:
        if "config" not in ckpt:
            raise CheckpointError(f"{path}: has no config; pass --config")
        cfg = config_from_dict(ckpt["config"])
    cfg.model.backbone_weights = None  # the checkpoint holds the weights
    model = create_model(cfg.model)
    load_weights(model, ckpt["model"], str(path))
    return model.to(device).eval(), cfg, ckpt


def rng_state() -> dict[str, Any]:
    """The torch, Python and NumPy generator states (and CUDA's when present), as tensors
    and lists so a ``weights_only`` load reads them back."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": np_state[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from a :func:`rng_state` dict."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
