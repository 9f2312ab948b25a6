"""Runtimes behind one entry point: ``load_backend(name, source, dtype) -> Predictor``.

A predictor maps a list of 3 x H x W float RGB images in [0, 1] (any sizes) to a list of
``{boxes (K, 4) x1y1x2y2 in each image's pixels, scores (K,), labels (K,) int64}`` torch
tensors, as the PyTorch model does; ``o2f predict``, ``o2f eval`` and ``o2f bench`` all run
through it and never branch per runtime. The backends, one module each:

  - ``eager``: the PyTorch model, BatchNorm folded, channels_last, float32 or bfloat16
    autocast (the last regression conv, the scales and the decoding stay float32);
  - ``compiled`` (also ``compile``, ``inductor``): the same with the network compiled by
    ``torch.compile``;
  - ``onnxruntime``: the NMS-free ONNX graph (float32, or int8 QDQ from ``o2f export
    --int8 --calib DIR``);
  - ``openvino``: the same graph (or its OpenVINO IR) compiled by OpenVINO for the CPU,
    bfloat16 on request where the CPU has native bf16, int8 from the QDQ graph.

``source`` is a checkpoint (``.pt``), an exported ``.onnx`` / ``.xml`` file, or an
:class:`o2f.model.detector.O2F` already in memory; a graph runtime given a checkpoint or a
model exports it first (dynamic sizes, into a temporary folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

BACKENDS = ("eager", "compiled", "onnxruntime", "openvino")
# other names users give the same backends
ALIASES = {"compile": "compiled", "inductor": "compiled", "torch.compile": "compiled",
           "torch": "eager", "pytorch": "eager", "ort": "onnxruntime", "onnx": "onnxruntime",
           "ov": "openvino"}


def backend_name(name: str) -> str:
    """The backend a user's spelling names (``ort`` -> ``onnxruntime``, ``inductor`` ->
    ``compiled``...); unknown names are returned as given, lower-cased."""
    return ALIASES.get(name.lower(), name.lower())


# the backends that run the PyTorch model itself (the others run an exported graph)
TORCH_BACKENDS = ("eager", "compiled")


class Predictor(Protocol):
    """What every backend returns (see the module docstring)."""

    class_names: list[str]
    num_classes: int
    description: str

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]: ...


class MissingBackendError(ImportError):
    """The runtime a backend needs is not installed; the message names the extra."""


def require(module: str, backend: str):
    """Import ``module`` or raise a one-line error naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingBackendError(
            f"the {backend} backend needs the '{module}' package: "
            f"pip install 'o2f[deploy]'") from None


def load_backend(name: str, source: str | Path | nn.Module, dtype: str | torch.dtype = "float32",
                 *, device: str | torch.device | None = None, threads: int | None = None,
                 class_names: list[str] | None = None) -> Predictor:
    """A :class:`Predictor` of ``source`` run by backend ``name`` in ``dtype``."""
    from o2f.precision import parse_dtype

    dtype = parse_dtype(dtype)
    name = backend_name(name)
    factory: Callable[..., Predictor]
    if name == "eager":
        from o2f.deploy.eager import EagerPredictor

        factory = EagerPredictor
    elif name == "compiled":
        from o2f.deploy.eager import CompiledPredictor

        factory = CompiledPredictor
    elif name == "onnxruntime":
        from o2f.deploy.onnxruntime import OnnxRuntimePredictor

        factory = OnnxRuntimePredictor
    elif name == "openvino":
        from o2f.deploy.openvino import OpenVinoPredictor

        factory = OpenVinoPredictor
    else:
        raise ValueError(f"unknown backend '{name}'; choose from {', '.join(BACKENDS)}")
    return factory(source, dtype, device=device, threads=threads,
                           class_names=class_names)


def to_torch(detections: list[dict]) -> list[dict[str, Tensor]]:
    """numpy detections (a graph runtime's) as torch tensors, labels int64."""
    out = []
    for det in detections:
        out.append({"boxes": torch.as_tensor(det["boxes"], dtype=torch.float32),
                    "scores": torch.as_tensor(det["scores"], dtype=torch.float32),
                    "labels": torch.as_tensor(det["labels"]).long()})
    return out


def graph_from(source: str | Path | nn.Module, backend: str) -> tuple[Path, list[str] | None]:
    """An ONNX (or OpenVINO IR) file for ``source``: itself when it is one, else a dynamic
    float32 export of the checkpoint / model into a temporary folder. Also the class names
    of a checkpoint (None otherwise: a graph carries its own)."""
    import tempfile

    from o2f.export import export_onnx

    if isinstance(source, (str, Path)) and Path(source).suffix in (".onnx", ".xml"):
        if not Path(source).is_file():
            raise FileNotFoundError(2, "graph file not found", str(source))
        return Path(source), None
    model, names = _model_and_names(source)
    folder = Path(tempfile.mkdtemp(prefix="o2f-"))
    path = export_onnx(model, folder / "model.onnx", size=(256, 320), dynamic=True,
                       class_names=names)
    return path, names


def _model_and_names(source: str | Path | nn.Module) -> tuple[nn.Module, list[str] | None]:
    if isinstance(source, nn.Module):
        return source.eval(), None
    from o2f.checkpoint import model_from_checkpoint

    model, _, ckpt = model_from_checkpoint(source)
    return model, ckpt.get("class_names")
