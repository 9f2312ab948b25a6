"""The PyTorch model as a predictor: BatchNorm folded into the convs, channels_last
weights, and bfloat16 autocast for ``dtype=bf16`` (the head keeps its last regression conv,
the scales and the decoding in float32: :meth:`o2f.model.head.O2FHead.box_distances`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from o2f.precision import autocast, dtype_name


class EagerPredictor:
    """``predictor(images) -> [{boxes, scores, labels}]`` with the PyTorch model."""

    def __init__(self, source: str | Path | nn.Module, dtype: torch.dtype = torch.float32, *,
                 device: str | torch.device | None = None, threads: int | None = None,
                 class_names: list[str] | None = None) -> None:
        from o2f.deploy import _model_and_names

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, names = _model_and_names(source)
        if isinstance(source, nn.Module):  # folding and re-laying out: on a copy
            model = copy.deepcopy(model)
        model = model.eval().to(self.device)
        model.fuse_batchnorm()
        self.model = model.to(memory_format=torch.channels_last)
        self.dtype = dtype
        self.num_classes = model.cfg.num_classes
        self.class_names = class_names or names or [str(i) for i in range(self.num_classes)]
        self.description = f"eager {dtype_name(dtype)}"

    def __call__(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        with torch.inference_mode(), autocast(self.device, self.dtype):
            detections = self.model([img.to(self.device) for img in images])
        return [{k: v.float() if v.is_floating_point() else v for k, v in d.items()}
                for d in detections]


class CompiledPredictor(EagerPredictor):
    """:class:`EagerPredictor` with the network (``forward_dense``: backbone, FPN, head)
    compiled by ``torch.compile`` (inductor); decoding and top-k stay eager. The first call
    at each new input size compiles (tens of seconds on a CPU), later calls reuse it."""

    def __init__(self, source: str | Path | nn.Module, dtype: torch.dtype = torch.float32, *,
                 device: str | torch.device | None = None, threads: int | None = None,
                 class_names: list[str] | None = None) -> None:
        super().__init__(source, dtype, device=device, threads=threads,
                         class_names=class_names)
        self.model.forward_dense = torch.compile(self.model.forward_dense)
        self.description = f"compiled {dtype_name(dtype)}"
