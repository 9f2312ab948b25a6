"""Options the docs advertise: NMS inference (the o2m + NMS baseline), ignore regions left
out of the loss, the cosine schedule, gradient clipping and synchronised BatchNorm."""

import math

import pytest
import torch
from conftest import rect_overrides

import o2f.engine as engine
from o2f.checkpoint import load_checkpoint
from o2f.config import ConfigError, load_config
from o2f.engine import lr_factor, train
from o2f.model.detector import O2F, HeadOutputs


def logit(p):
    return math.log(p / (1 - p))


def hand_made_outputs():
    """One image, one 2 x 2 level of stride 16 (points at 8 and 24), two classes.

    Points 0 and 1 predict almost the same box of class 0 (IoU 0.82) with scores 0.9 and
    0.8; point 3 predicts the same box with class 1 (score 0.7); point 2 predicts a box
    elsewhere (class 0, 0.6). The objectness logit is large, so score ~ sigmoid(cls)."""
    points = torch.tensor([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0], [24.0, 24.0]])
    boxes = torch.tensor([[2.0, 2.0, 30.0, 20.0], [4.0, 2.0, 30.0, 20.0],
                          [2.0, 22.0, 14.0, 30.0], [2.0, 2.0, 30.0, 20.0]])
    ltrb = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], 1)
    cls = torch.full((4, 2), -20.0)
    for i, (c, p) in enumerate([(0, 0.9), (0, 0.8), (0, 0.6), (1, 0.7)]):
        cls[i, c] = logit(p)
    return HeadOutputs(cls[None], ltrb[None], torch.full((1, 4), 30.0), points,
                       torch.full((4,), 16.0), [(2, 2)]), boxes


@pytest.mark.parametrize("nms", [False, True])
def test_nms_path_collapses_a_duplicate_of_the_same_class(nms):
    # the detector's own top-k (the digits preset's rescorer off: tests/test_rescore.py)
    model = O2F(load_config("digits", ["model.num_classes=2", f"model.nms={nms}",
                                       "model.rescore=false"]).model)
    out, boxes = hand_made_outputs()
    got_boxes, scores, labels = model.postprocess(out, [(32, 32)])
    keep = scores[0] > model.cfg.score_thresh
    found = sorted(zip(scores[0][keep].tolist(), labels[0][keep].tolist(),
                       got_boxes[0][keep].tolist(), strict=True), reverse=True)
    expected = [(0.9, 0, boxes[0]), (0.8, 0, boxes[1]), (0.7, 1, boxes[3]), (0.6, 0, boxes[2])]
    if nms:  # 0.8 overlaps 0.9 of its own class (IoU 0.82 > 0.6); class 1 is kept
        del expected[1]
    assert [(round(s, 4), c) for s, c, _ in found] == [(s, c) for s, c, _ in expected]
    for (_, _, got), (_, _, want) in zip(found, expected, strict=True):
        assert got == pytest.approx(want.tolist(), abs=1e-4)


def test_nms_defaults_on_for_o2m_only():
    assert load_config("digits").model.use_nms is False
    assert load_config("digits", ["model.assign=o2m"]).model.use_nms is True
    assert load_config("digits", ["model.assign=o2m", "model.nms=false"]).model.use_nms is False


def test_ignore_mode_exclude_leaves_the_points_inside_out_of_the_loss():
    torch.manual_seed(0)
    model = O2F(load_config("digits", ["model.num_classes=3"]).model).train()
    torch.nn.init.zeros_(model.head.cls_out.bias)  # p ~ 1/4: negatives weigh in the loss
    image = torch.rand(3, 96, 128)
    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1]),
              "ignore_boxes": torch.tensor([[70.0, 20.0, 120.0, 90.0]])}
    batch, _, _, targets = model.preprocess([image], [target])
    out = model.forward_dense(batch)
    model.cfg.ignore_mode = "drop"
    drop = model.losses(out, targets, t=0.5)
    num_pos = (model.assign(out, targets, 0.5)[0].labels < 3).sum().item()
    model.cfg.ignore_mode = "exclude"
    exclude = model.losses(out, targets, t=0.5)

    # the difference is the negative term of every class at the points strictly inside
    # the ignore box, 0.75 p^2 * -log(1 - p), over the same number of positives
    x, y = out.points.double().unbind(1)
    inside = (x > 70) & (x < 120) & (y > 20) & (y < 90)
    assert 10 < inside.sum() < len(x) // 2
    p = (torch.sigmoid(out.cls_logits[0].double())
         * torch.sigmoid(out.obj_logits[0].double())[:, None])[inside]
    expected = (0.75 * p**2 * -torch.log1p(-p)).sum() / max(num_pos, 1)
    assert num_pos > 0
    diff = (drop["loss_cls"] - exclude["loss_cls"]).item()
    assert diff == pytest.approx(expected.item(), rel=1e-3)
    assert exclude["loss_box"].item() == pytest.approx(drop["loss_box"].item(), rel=1e-6)


def test_cosine_schedule_values():
    cfg = load_config("digits", ["train.warmup_iters=0", "train.epochs=4"])
    assert cfg.train.schedule == "cosine"
    values = [lr_factor(it, cfg, iters_per_epoch=10) for it in (0, 10, 20, 30, 40, 50)]
    # 0.5 (1 + cos(pi * it / 40)): 1, (1 + 1/sqrt 2) / 2, 1/2, (1 - 1/sqrt 2) / 2, 0, 0
    assert values == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0, 0.0], abs=1e-7)
    # max_iters stops a run early without changing its schedule
    early = load_config("digits", ["train.warmup_iters=0", "train.epochs=4",
                                   "train.max_iters=20"])
    assert lr_factor(10, early, 10) == pytest.approx(0.8535534)
    # warm-up multiplies: 100 iterations from 0.01
    warm = load_config("digits", ["train.epochs=4"])
    assert (warm.train.warmup_iters, warm.train.warmup_ratio) == (100, 0.01)
    assert lr_factor(50, warm, 100) == pytest.approx(
        (0.01 + 0.99 * 0.5) * 0.5 * (1 + math.cos(math.pi * 50 / 400)))


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_the_first_step(rectangles, tmp_path, clip):
    # plain SGD, no warm-up, no decay: the first update is exactly lr x the (clipped) gradient
    overrides = rect_overrides(rectangles, **{
        "train.max_iters": 1, "train.eval_every": 0, "train.optimizer": "sgd",
        "train.lr": 0.1, "train.momentum": 0.0, "train.weight_decay": 0.0,
        "train.warmup_iters": 0, "train.grad_clip": "null" if clip is None else clip})
    cfg = load_config("digits", overrides)
    train(cfg, tmp_path)
    torch.manual_seed(cfg.train.seed)  # the weights the run started from
    initial = dict(O2F(load_config("digits", overrides).model).named_parameters())
    trained = load_checkpoint(tmp_path / "last.pt")["model"]
    step = torch.cat([(trained[k] - v.detach()).flatten() for k, v in initial.items()]).norm()
    if clip is None:
        assert step > 100 * 0.1 * 1e-3  # the raw gradient is far above the clip below
    else:
        assert step.item() == pytest.approx(0.1 * clip, rel=1e-3)


def test_sync_bn_on_the_cpu_is_a_clear_error(rectangles, tmp_path, monkeypatch):
    # SyncBatchNorm only runs on CUDA tensors; two CPU processes get a message, not a
    # traceback from inside the first forward
    monkeypatch.setattr(engine.du, "world_size", lambda: 2)
    cfg = load_config("digits", rect_overrides(rectangles, **{"train.sync_bn": True}))
    with pytest.raises(ConfigError, match="train.sync_bn=true needs CUDA"):
        train(cfg, tmp_path)
    cfg.train.sync_bn = False  # without it the same set-up goes on to the data-parallel part
    with pytest.raises(Exception) as e:
        train(cfg, tmp_path / "b")
    assert not isinstance(e.value, ConfigError)
