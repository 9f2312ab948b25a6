"""Training and evaluation loops.

``train(cfg, work_dir)`` runs the whole recipe: data, model, optimiser, schedule, the
soft-label ceiling fed from the epoch, checkpoints, evaluation and logs; it runs the same
in one process or under torchrun. ``evaluate`` runs the NMS-free detector over a split and
scores it with the split's own metric. Reading and writing checkpoints lives in
:mod:`o2f.checkpoint`, the log files in :mod:`o2f.logs`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from o2f import distributed as du
from o2f.assign import soft_label_ceiling, soft_label_ceiling_by_iter
from o2f.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from o2f.config import Config, ConfigError, save_config
from o2f.data import build_dataset, collate_eval, collate_train
from o2f.logs import EventWriter, setup_logging
from o2f.model.detector import create_model
from o2f.precision import autocast, resolve_amp

__all__ = [
    "EpochDataset", "NonFiniteLossError", "OutOfMemoryHint", "TrainState", "base_lr",
    "build_optimizer", "encode_masks", "epoch_batches", "evaluate", "lr_factor",
    "param_groups", "predict", "seed_everything", "soft_label_phase", "total_iters", "train",
    # moved to o2f.checkpoint and o2f.logs; re-exported so existing imports keep working
    "CheckpointError", "EventWriter", "load_checkpoint", "load_weights",
    "model_from_checkpoint", "save_checkpoint", "setup_logging",
]

log = logging.getLogger("o2f")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left untouched."""


class OutOfMemoryHint(RuntimeError):
    """The device ran out of memory; the message says what to lower."""


@dataclass
class TrainState:
    """Where training is: the epoch being run and how many of its batches are done."""

    epoch: int = 0
    iter_in_epoch: int = 0
    global_iter: int = 0
    skipped_nonfinite: int = 0
    replaced_images: int = 0


# --------------------------------------------------------------------------- optimiser

def param_groups(model: nn.Module, weight_decay: float, exclude: set[int] | None = None
                 ) -> list[dict[str, Any]]:
    """Weight decay on every trainable parameter except those of normalisation layers;
    parameters whose id is in ``exclude`` left out."""
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    decay, no_decay, seen = [], [], set(exclude or ())
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, norm_types) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def base_lr(cfg: Config) -> float:
    """The recipe's learning rate scaled linearly with the total batch size."""
    return cfg.train.lr * cfg.train.batch_size / cfg.train.base_batch_size


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The optimiser over ``param_groups``; the rescorer's parameters (``model.rescore``)
    in groups of their own, marked ``rescorer`` (their lr follows ``train.rescore_schedule``
    and ``train.rescore_lr_mult``)."""
    t = cfg.train
    rescorer = getattr(model, "rescorer", None)
    if rescorer is None:
        groups = param_groups(model, t.weight_decay)
    else:
        own = {id(p) for p in rescorer.parameters()}
        groups = [g for g in param_groups(model, t.weight_decay, exclude=own) if g["params"]]
        groups += [dict(g, rescorer=True) for g in param_groups(rescorer, t.weight_decay)
                   if g["params"]]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr(cfg), momentum=t.momentum)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=base_lr(cfg))
    raise ValueError(f"train.optimizer must be sgd or adamw, got '{t.optimizer}'")


def lr_factor(it: int, cfg: Config, iters_per_epoch: int, schedule: str | None = None
              ) -> float:
    """Multiplier of the base lr at global iteration ``it``: linear warm-up from
    ``warmup_ratio``, then x0.1 at each epoch of ``steps`` (or cosine decay to 0 over all
    ``epochs``, or constant; ``max_iters`` stops a run early without changing its
    schedule). ``schedule`` replaces ``train.schedule``."""
    t = cfg.train
    schedule = schedule or t.schedule
    total = t.epochs * iters_per_epoch
    if schedule == "constant":
        factor = 1.0
    elif schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(it / max(total, 1), 1.0)))
    elif schedule == "step":
        epoch = it // max(iters_per_epoch, 1)
        factor = 0.1 ** sum(epoch >= s for s in t.steps)
    else:
        raise ValueError(f"unknown lr schedule '{schedule}' (train.schedule and "
                         "train.rescore_schedule take step, cosine or constant)")
    if it < t.warmup_iters:
        factor *= t.warmup_ratio + (1 - t.warmup_ratio) * it / t.warmup_iters
    return factor


def total_iters(cfg: Config, iters_per_epoch: int) -> int:
    total = cfg.train.epochs * iters_per_epoch
    return min(total, cfg.train.max_iters) if cfg.train.max_iters else total


# --------------------------------------------------------------------------- data order

def epoch_batches(sizes: list[tuple[int, int]], batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True, pool: int = 8) -> list[list[int]]:
    """The global batches of one epoch, a pure function of (seed, epoch).

    ``sizes`` are the images' (height, width). Images are grouped by orientation
    (landscape / portrait) so a batch pads little; each group is shuffled and filled up to
    a multiple of ``batch_size`` by repeating its own first images; within each run of
    ``pool`` batches images are sorted by area before being cut into batches, which cuts
    padding further while keeping the order random. The batches are shuffled together.
    Every process computes the same list and takes its slice of each batch, so N processes
    see exactly the samples one process would, and a resumed run can skip the batches done.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    area = torch.tensor([h * w + h / 65536 for h, w in sizes], dtype=torch.float64)  # then h
    flags = torch.tensor([w >= h for h, w in sizes], dtype=torch.bool)
    batches = []
    for group in (torch.nonzero(flags).squeeze(1), torch.nonzero(~flags).squeeze(1)):
        if group.numel() == 0:
            continue
        if shuffle:
            group = group[torch.randperm(group.numel(), generator=g)]
        pad = -group.numel() % batch_size
        group = torch.cat([group, group.repeat(pad // group.numel() + 1)[:pad]])
        for chunk in group.split(batch_size * pool):
            chunk = chunk[torch.sort(area[chunk], stable=True).indices]
            batches += chunk.view(-1, batch_size).tolist()
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class EpochDataset(Dataset):
    """Wraps a training dataset: seeds each sample's augmentation from (seed, epoch, index),
    so augmentation does not depend on worker count or on resuming, and replaces an image
    that can no longer be read by the next one (logged, and counted in the target)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
                try:
                    image, target = self.dataset[i]
                except OSError as e:
                    log.warning("skipping unreadable image (replaced by the next one): %s", e)
                    continue
            target["replaced"] = attempt
            return image, target
        raise RuntimeError("no readable image left in the training set")


# --------------------------------------------------------------------------- training

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def soft_label_phase(cfg: Config, epoch: int, iteration: int, iters_per_epoch: int
                     ) -> tuple[float, bool]:
    """The schedule the loss is given at ``epoch`` and global ``iteration``: the ceiling t
    of the soft anchors' labels, and whether soft anchors exist at all (False in the last
    phase set by ``model.o2o_from``, where they are plain negatives, as in o2o).

    ``model.t_schedule="epoch"`` is the release's linear fall by epoch index; ``"iter"``
    falls by iteration and reaches ``t_end`` at ``model.t_end_at`` of training.
    """
    m, epochs = cfg.model, cfg.train.epochs
    progress = iteration / max(epochs * iters_per_epoch, 1)
    if m.t_schedule == "epoch":
        t = soft_label_ceiling(epoch, epochs, m.t_start, m.t_end)
    elif m.t_schedule == "iter":
        t = soft_label_ceiling_by_iter(progress, m.t_start, m.t_end, m.t_end_at)
    else:
        raise ValueError(f"model.t_schedule must be epoch or iter, got '{m.t_schedule}'")
    return t, progress < m.o2o_from


def _to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in t.items()} for t in targets]


def train(cfg: Config, work_dir: str | Path, *, resume: bool = False) -> dict[str, float]:
    """Train ``cfg`` into ``work_dir`` (``last.pt``, ``metrics.jsonl``, ``log.jsonl``,
    ``train.log``, ``config.yaml``, TensorBoard events). Returns the last evaluation."""
    work_dir = Path(work_dir)
    device = du.init_from_env()
    if du.is_main():
        work_dir.mkdir(parents=True, exist_ok=True)
    du.barrier()
    setup_logging(work_dir)
    seed_everything(cfg.train.seed)
    world, rank = du.world_size(), du.rank()
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not divisible by the "
                         f"{world} processes")
    per_rank = cfg.train.batch_size // world

    last = work_dir / "last.pt"
    if resume and not last.exists():  # before any work or log line
        raise CheckpointError(f"{last}: nothing to resume from")
    train_set = build_dataset(cfg, "train")
    val_set = build_dataset(cfg, "val") if cfg.train.eval_every > 0 else None
    model = create_model(cfg.model).to(device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    # float16 needs loss scaling (its range is narrow); bfloat16 has float32's range
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if cfg.train.channels_last:  # convolutions then output NHWC from NCHW inputs too
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and world > 1:
        if device.type != "cuda":  # PyTorch's SyncBatchNorm refuses CPU tensors
            raise ConfigError("train.sync_bn=true needs CUDA devices; on the CPU each "
                              "process keeps its own batch statistics (set it to false)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(model, cfg)
    state = TrainState()
    if resume:
        ckpt = load_checkpoint(last)
        load_weights(model, ckpt["model"], str(last))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # e.g. written before the rescorer had groups of its own
            raise CheckpointError(
                f"{last}: its optimizer state does not match this run's parameter groups "
                f"({e}); it cannot be resumed, train again") from e
        if "scaler" in ckpt and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        state = TrainState(**ckpt["state"])
        set_rng_state(ckpt["rng"])
        log.info("resumed from %s at epoch %d, iteration %d of the epoch", last,
                 state.epoch, state.iter_in_epoch)
    if du.is_main():
        save_config(cfg, work_dir / "config.yaml")
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    image_sizes = [(info["height"], info["width"])
                   for info in map(train_set.get_image_info, range(len(train_set)))]
    iters_per_epoch = len(epoch_batches(image_sizes, cfg.train.batch_size, cfg.train.seed, 0))
    stop_at = total_iters(cfg, iters_per_epoch)
    events = EventWriter(work_dir)
    epoch_data = EpochDataset(train_set, cfg.train.seed)
    metrics: dict[str, float] = {}

    def checkpoint() -> None:
        if du.is_main():
            save_checkpoint(last, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "state": asdict(state), "rng": rng_state(), "config": cfg.to_dict(),
                **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                "class_names": list(train_set.class_names), "cat_ids": list(train_set.cat_ids),
            })
        du.barrier()

    for epoch in range(state.epoch, cfg.train.epochs):
        if state.global_iter >= stop_at:
            break
        epoch_data.epoch = epoch
        batches = epoch_batches(image_sizes, cfg.train.batch_size, cfg.train.seed, epoch)
        todo = batches[state.iter_in_epoch:][:stop_at - state.global_iter]
        local = [b[rank * per_rank:(rank + 1) * per_rank] for b in todo]
        loader = DataLoader(epoch_data, batch_sampler=local, collate_fn=collate_train,
                            num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        net.train()
        bar = tqdm(loader, total=len(local), initial=0, disable=not du.is_main(),
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", dynamic_ncols=True)
        for images, sizes, targets in bar:
            lr = base_lr(cfg) * lr_factor(state.global_iter, cfg, iters_per_epoch)
            rescore_lr = base_lr(cfg) * cfg.train.rescore_lr_mult * lr_factor(
                state.global_iter, cfg, iters_per_epoch, cfg.train.rescore_schedule)
            t, soft_anchors = soft_label_phase(cfg, epoch, state.global_iter,
                                               iters_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = rescore_lr if group.get("rescorer") else lr
            images = images.to(device, non_blocking=True)
            targets = _to_device(targets, device)
            state.replaced_images += sum(int(tg.get("replaced", 0)) for tg in targets)
            try:
                with autocast(device, amp_dtype):
                    losses = net(images, targets, image_sizes=sizes, t=t,
                                 soft_anchors=soft_anchors)
                total = sum(losses.values())
            except torch.OutOfMemoryError as e:
                raise OutOfMemoryHint(
                    f"out of memory at iteration {state.global_iter} on a batch of "
                    f"{images.shape[0]} images of {images.shape[2]}x{images.shape[3]} px per "
                    f"process: lower train.batch_size (the lr follows), data.max_size / "
                    f"data.min_size, or enable mixed precision (train.amp=bf16); "
                    f"{last} holds the last checkpoint") from e
            finite = torch.isfinite(total.detach()).float()
            if world > 1:
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            optimizer.zero_grad(set_to_none=True)
            if finite.item() < 1:
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                if not cfg.train.skip_nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite loss at iteration {state.global_iter} (epoch {epoch + 1}, "
                        f"batch {state.iter_in_epoch}): {terms}; {last} still holds the last "
                        "good checkpoint (set train.skip_nonfinite=true to skip such steps)")
                state.skipped_nonfinite += 1
                log.warning("skipped a non-finite step at iteration %d: %s",
                            state.global_iter, terms)
            else:
                scaler.scale(total).backward()
                if cfg.train.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            state.iter_in_epoch += 1
            state.global_iter += 1
            if du.is_main():
                bar.set_postfix({**{k[5:]: f"{v.item():.3f}" for k, v in losses.items()},
                                 "lr": f"{lr:.2e}"}, refresh=False)
            if state.global_iter % cfg.train.log_every == 0 or state.global_iter == stop_at:
                events.write("log.jsonl", {
                    "iter": state.global_iter, "epoch": epoch + state.iter_in_epoch / len(
                        batches), "lr": lr, "t": t, "soft_anchors": soft_anchors,
                    "loss": total.item(),
                    **{k: v.item() for k, v in losses.items()},
                    "skipped_nonfinite": state.skipped_nonfinite,
                    "replaced_images": state.replaced_images}, state.global_iter)
            if cfg.train.ckpt_every and state.global_iter % cfg.train.ckpt_every == 0:
                checkpoint()
        bar.close()
        finished_epoch = state.iter_in_epoch >= len(batches)
        if finished_epoch:
            state.epoch, state.iter_in_epoch = epoch + 1, 0
        checkpoint()
        last_epoch = state.epoch >= cfg.train.epochs or state.global_iter >= stop_at
        if val_set is not None and (last_epoch or (
                finished_epoch and state.epoch % cfg.train.eval_every == 0)):
            metrics = evaluate(model, val_set, cfg, device, dtype=amp_dtype)
            events.write("metrics.jsonl", {**metrics, "epoch": state.epoch}, state.global_iter)
    if state.replaced_images:
        log.warning("%d unreadable training images were replaced", state.replaced_images)
    events.close()
    du.shutdown()
    return metrics


# --------------------------------------------------------------------------- evaluation

@torch.inference_mode()
def predict(model: nn.Module | Callable[[list[Tensor]], list[dict]], dataset: Dataset,
            cfg: Config, device: torch.device, *, desc: str = "eval",
            dtype: torch.dtype | None = None) -> list[dict[str, Any]]:
    """Detections of this process's share of ``dataset`` in the COCO results format
    (``image_id``, ``category_id``, ``bbox`` as x, y, w, h in original pixels, ``score``;
    for the instance model also ``segmentation``, the mask as COCO RLE with str counts).

    ``model`` is the network (run in eval mode, under ``dtype`` autocast when given) or any
    detector callable, such as a :mod:`o2f.deploy` predictor (run as it is)."""
    is_module = isinstance(model, nn.Module)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    indices = list(range(du.rank(), len(dataset), du.world_size()))  # type: ignore[arg-type]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices),
                        batch_size=cfg.train.eval_batch_size, collate_fn=collate_eval,
                        num_workers=cfg.data.num_workers)
    results = []
    for images, targets in tqdm(loader, desc=desc, disable=not du.is_main(),
                                dynamic_ncols=True, leave=False):
        with autocast(device, dtype if is_module else None):
            detections = model([img.to(device, non_blocking=True) for img in images])
        for det, tgt in zip(detections, targets, strict=True):
            boxes = det["boxes"].float().cpu()
            boxes[:, 2:] -= boxes[:, :2]
            rles = encode_masks(det["masks"]) if "masks" in det else None
            for j, (box, score, label) in enumerate(zip(
                    boxes.tolist(), det["scores"].float().tolist(), det["labels"].tolist(),
                    strict=True)):
                results.append({"image_id": int(tgt["image_id"]),
                                "category_id": int(dataset.label_to_cat_id(label)),
                                "bbox": [round(v, 3) for v in box], "score": round(score, 5)})
                if rles is not None:
                    results[-1]["segmentation"] = rles[j]
    if is_module:
        model.train(was_training)
    return results


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """Binary masks (K, H, W) as COCO RLE dicts ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def evaluate(model: nn.Module | Callable[[list[Tensor]], list[dict]], dataset: Dataset,
             cfg: Config, device: torch.device, *, results_out: str | Path | None = None,
             per_class: bool = False, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Run and score the detector on ``dataset`` (sharded over processes, scored on rank 0
    and shared with all); ``model`` and ``dtype`` as in :func:`predict`."""
    from o2f.evaluation import evaluate_detections

    start = time.perf_counter()
    results = [r for part in du.all_gather_object(predict(model, dataset, cfg, device, dtype=dtype))
               for r in part]
    metrics: dict[str, float] = {}
    if du.is_main():
        metrics = evaluate_detections(dataset, results, results_out=results_out,
                                      per_class=per_class,
                                      segm=cfg.model.task == "instance")
        log.info("evaluation (%d images, %.1fs): %s", len(dataset),  # type: ignore[arg-type]
                 time.perf_counter() - start,
                 " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return du.broadcast_object(metrics)
