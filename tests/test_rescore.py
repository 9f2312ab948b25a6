"""The learnt rescoring of the top-k (``model.rescore``, o2f.model.rescore): its pair
features and targets on hand values, what it reads, that it learns to remove repeats NMS
would remove while keeping overlapping objects, its place in the detector and the graph."""

import math

import pytest
import torch
from conftest import rect_overrides
from test_end_to_end import exported_without_nms
from test_model import synthetic_image, tiny_config
from torch import nn

from o2f.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from o2f.config import load_config
from o2f.engine import build_optimizer, lr_factor, train
from o2f.model.detector import O2F
from o2f.model.rescore import Rescorer, pair_features, rescore_loss, rescore_targets


def test_pair_features_on_two_half_overlapping_boxes_and_a_far_one():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 0, 15, 10], [100, 100, 120, 140]]])
    logits = torch.tensor([[2.0, 0.5, 1.0]])
    labels = torch.tensor([[0, 0, 1]])
    features, overlap = pair_features(boxes, logits, labels)
    assert features.shape == (1, 3, 3, 9)
    # what box 0 reads of box 1: IoU 50 / 150, half of each covered, centre 0.5 of box 0's
    # width to the right, same size, logit 1.5 lower, same label
    torch.testing.assert_close(features[0, 0, 1], torch.tensor(
        [1 / 3, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, -1.5, 1.0]))
    # box 2 read from box 0: no overlap, offset clamped to 4 widths, twice as wide, 4x as tall
    torch.testing.assert_close(features[0, 0, 2], torch.tensor(
        [0.0, 0.0, 0.0, 4.0, 4.0, math.log(2), math.log(4), -1.0, 0.0]))
    assert overlap[0].tolist() == [[False, True, False], [True, False, False],
                                   [False, False, False]]


def test_targets_keep_each_objects_best_scored_detection_and_drop_its_repeats():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
    gt_labels = torch.tensor([0, 0])
    boxes = torch.tensor([
        [0.0, 0, 10, 8],    # gt 0, IoU 0.8, best-scored: kept
        [0.0, 0, 10, 9],    # gt 0 again, IoU 0.9 but lower score: a repeat
        [20.0, 0, 30, 6],   # gt 1, IoU 0.6: kept
        [20.0, 0, 30, 10],  # same box as gt 1 but another class: no object's
        [0.0, 0, 10, 3],    # gt 0 at IoU 0.3: under 0.5, no object's
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 0])
    target = rescore_targets(boxes, scores, labels, gt, gt_labels)
    assert target.tolist() == [1, 0, 1, -1, -1]
    # a detection overlapping two objects goes to the one it overlaps most, so the other
    # object keeps its own: the first box has IoU 0.82 with gt B, 0.54 with gt A; the
    # second, lower-scored, IoU 0.9 with gt A
    two = torch.tensor([[0.0, 0, 10, 10], [4, 0, 14, 10]])
    between = torch.tensor([[3.0, 0, 13, 10], [0, 0, 10, 9]])
    assert rescore_targets(between, scores[:2], labels[:2], two, gt_labels).tolist() == [1, 1]
    assert rescore_targets(boxes, scores, labels, gt[:0], gt_labels[:0]).eq(-1).all()
    # the loss: summed cross-entropy over the object's detections (the first three) divided
    # by the detections to keep (2); the last two count for nothing, whatever their logits
    logits = torch.tensor([[0.0, math.log(3), 0.0, 9.0, -9.0]])
    expected = (2 * math.log(2) + math.log(4)) / 2  # BCE(0, y) = log 2; BCE(log 3, 0) = log 4
    assert rescore_loss(logits, target[None]).item() == pytest.approx(expected)


def test_rescorer_starts_at_the_detector_scores_and_reads_only_overlapping_detections():
    torch.manual_seed(0)
    rescorer = Rescorer(num_classes=2)
    boxes = torch.tensor([[[0.0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]]])
    scores = torch.tensor([[0.9, 0.8, 0.3]])
    labels = torch.tensor([[0, 0, 1]])
    torch.testing.assert_close(rescorer.rescore(boxes, scores, labels),
                               scores * torch.sigmoid(torch.tensor(4.0)))
    # a detection called a repeat (q = 0) keeps the floor's share of its score, one called
    # its object's detection (q = 1) all of it
    with torch.no_grad():
        rescorer.keep.bias.fill_(-100.0)
        torch.testing.assert_close(rescorer.rescore(boxes, scores, labels, 0.2), scores * 0.2)
        rescorer.keep.bias.fill_(100.0)
        torch.testing.assert_close(rescorer.rescore(boxes, scores, labels, 0.2), scores)
    nn.init.normal_(rescorer.keep.weight)
    before = rescorer(boxes, scores, labels)
    moved = boxes.clone()
    moved[0, 2] = torch.tensor([25.0, 0, 35, 10])  # the lone box moves, still alone: the
    # others (which would read it 2.5 widths away instead of 4) are unchanged
    after = rescorer(moved, scores, labels)
    torch.testing.assert_close(after[0, :2], before[0, :2])
    moved = boxes.clone()
    moved[0, 1] += 4  # the neighbour of box 0 moves: box 0's score changes
    assert not torch.allclose(rescorer(moved, scores, labels)[0, 0], before[0, 0])


def _clusters(generator: torch.Generator, objects: int = 12, repeats: int = 3):
    """A scene of ``objects`` boxes, some pairs overlapping (a crowd), each repeated
    ``repeats`` times with jitter and lower scores; scores of different objects interleave
    (a repeat can outscore another object's best), so a detection's own score and rank do
    not tell a repeat. Returns boxes, scores, labels sorted by score, and the gt boxes."""
    centres = torch.rand(objects, 2, generator=generator) * 200 + 40
    centres[1::2] = centres[0::2] + torch.tensor([14.0, 0.0])  # pairs of touching objects
    size = torch.rand(objects, 2, generator=generator) * 20 + 20
    gt = torch.cat([centres - size / 2, centres + size / 2], 1)
    top = torch.rand(objects, generator=generator) * 0.5 + 0.45
    boxes, scores = [gt + torch.randn(objects, 4, generator=generator)], [top]
    for _ in range(repeats):
        boxes.append(gt + torch.randn(objects, 4, generator=generator) * 2)
        scores.append(top * (torch.rand(objects, generator=generator) * 0.4 + 0.5))
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    order = scores.argsort(descending=True)
    return boxes[order], scores[order], torch.zeros(len(order), dtype=torch.int64), gt


def _repeats_and_kept(rescorer: Rescorer, generator: torch.Generator, scenes: int = 20):
    """Over fresh scenes: detections scoring >= 0.3 that the targets call repeats, and
    objects whose kept detection scores >= 0.3."""
    repeats = kept = objects = 0
    for _ in range(scenes):
        boxes, scores, labels, gt = _clusters(generator)
        target = rescore_targets(boxes, scores, labels, gt, torch.zeros(len(gt), dtype=int))
        with torch.no_grad():
            new = rescorer.rescore(boxes[None], scores[None], labels[None])[0]
        repeats += int(((new >= 0.3) & (target == 0)).sum())
        kept += int(((new >= 0.3) & (target > 0)).sum())
        objects += len(gt)
    return repeats / scenes, kept / objects


def test_rescorer_learns_to_remove_repeats_and_keep_each_object():
    torch.manual_seed(0)
    rescorer = Rescorer(num_classes=1)
    generator = torch.Generator().manual_seed(0)
    repeats_before, kept_before = _repeats_and_kept(rescorer, torch.Generator().manual_seed(1))
    assert repeats_before > 20  # most of the 36 repeats score above 0.3 at the start
    optimizer = torch.optim.AdamW(rescorer.parameters(), lr=3e-3)
    for _ in range(200):
        batch = [_clusters(generator) for _ in range(4)]
        targets = torch.stack([rescore_targets(b, s, lab, gt, torch.zeros(len(gt), dtype=int))
                               for b, s, lab, gt in batch])
        logits = rescorer(*(torch.stack([item[i] for item in batch]) for i in range(3)))
        optimizer.zero_grad()
        rescore_loss(logits, targets).backward()
        optimizer.step()
    repeats, kept = _repeats_and_kept(rescorer, torch.Generator().manual_seed(1))
    assert repeats < 1.0 and kept > 0.9, (repeats_before, kept_before, repeats, kept)


def test_rescore_is_an_option_of_the_detector_trained_on_its_own_detached_top_k():
    torch.manual_seed(0)
    model = O2F(tiny_config(rescore=True, rescore_weight=2.0)).train()
    plain = O2F(tiny_config())
    extra = set(model.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("rescorer.") for k in extra)
    nn.init.constant_(model.head.reg_out.bias, 2.0)  # boxes of 4 strides: cells repeat them
    image, _ = synthetic_image()
    with torch.no_grad():  # an object where the detector's best detection is: it repeats it
        batch, sizes, _, _ = model.preprocess([image])
        boxes, _, labels, _ = model._candidates(model.forward_dense(batch), sizes)
    target = {"boxes": boxes[0, :1], "labels": labels[0, :1]}
    losses = model([image], [target], t=0.6)
    assert set(losses) == {"loss_cls", "loss_box", "loss_rescore"}
    losses["loss_rescore"].backward()  # reaches the rescorer, nothing of the detector
    assert model.rescorer.keep.weight.grad.abs().sum() > 0
    detector = [p for n, p in model.named_parameters() if not n.startswith("rescorer.")]
    assert all(p.grad is None for p in detector)
    # the weight scales the loss
    model.cfg.rescore_weight = 1.0
    torch.manual_seed(1)
    half = model([image], [target], t=0.6)["loss_rescore"]
    torch.testing.assert_close(2 * half, losses["loss_rescore"])


def test_inference_rescores_the_detectors_top_k_and_orders_them_again():
    torch.manual_seed(0)
    model = O2F(tiny_config(rescore=True, topk=20, score_thresh=0.0)).eval()
    nn.init.normal_(model.head.cls_out.weight, std=0.5)
    nn.init.normal_(model.rescorer.keep.weight, std=1.0)
    image, _ = synthetic_image()
    batch, sizes, _, _ = model.preprocess([image])
    out = model.forward_dense(batch)
    with torch.no_grad():
        boxes, scores, labels = model.postprocess(out, sizes)
        cand_boxes, cand_scores, cand_labels, _ = model._candidates(out, sizes)
        keep = torch.sigmoid(model.rescorer(cand_boxes, cand_scores, cand_labels))
        rescored = cand_scores * (0.2 + 0.8 * keep)  # model.rescore_floor=0.2
    expected, order = rescored.sort(descending=True)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(boxes, cand_boxes[0, order[0]][None])
    assert torch.equal(labels, cand_labels.gather(1, order))
    assert not torch.allclose(scores, cand_scores)


def test_rescorer_lr_is_held_while_the_detectors_decays():
    cfg = load_config("digits", ["train.epochs=4"])  # cosine, warm-up 100 from 0.01
    assert (cfg.train.schedule, cfg.train.rescore_schedule) == ("cosine", "constant")
    # the rescorer's: the same warm-up, then held
    assert lr_factor(50, cfg, 100, "constant") == pytest.approx(0.01 + 0.99 * 0.5)
    assert [lr_factor(it, cfg, 100, "constant") for it in (100, 200, 399, 400)] == [1.0] * 4
    assert lr_factor(200, cfg, 100) == pytest.approx(0.5)  # the detector's, half-way
    # its parameters in groups of their own, every parameter once, weight decay as before
    model = O2F(cfg.model)
    groups = build_optimizer(model, cfg).param_groups
    own = {id(p) for p in model.rescorer.parameters()}
    for g in groups:
        assert {id(p) in own for p in g["params"]} == {bool(g.get("rescorer"))}
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert {g["weight_decay"] for g in groups} == {0.0, cfg.train.weight_decay}


def test_training_holds_the_rescorers_lr_at_its_multiple(rectangles, tmp_path):
    cfg = load_config("digits", rect_overrides(rectangles, **{
        "train.max_iters": 3, "train.eval_every": 0, "train.warmup_iters": 0,
        "train.rescore_lr_mult": 2.0}))
    train(cfg, tmp_path)
    groups = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    base = cfg.train.lr  # batch_size = base_batch_size
    rescorer = [g["lr"] for g in groups if g.get("rescorer")]
    detector = [g["lr"] for g in groups if not g.get("rescorer")]
    assert rescorer and rescorer == pytest.approx([2 * base] * len(rescorer))
    assert detector and max(detector) < 0.99 * base  # cosine-decayed by the third step
    # a checkpoint whose optimizer mixed the rescorer into the detector's groups (as runs
    # before it had its own did) is a clear error on resume, not a traceback
    ckpt = load_checkpoint(tmp_path / "last.pt")
    old = ckpt["optimizer"]["param_groups"]
    ckpt["optimizer"]["param_groups"] = [
        dict(g, params=[i for h in old if h["weight_decay"] == g["weight_decay"]
                        for i in h["params"]]) for g in old if not g.get("rescorer")]
    save_checkpoint(tmp_path / "last.pt", ckpt)
    with pytest.raises(CheckpointError, match="last.pt: its optimizer state does not match"):
        train(cfg, tmp_path, resume=True)


def test_rescore_exports_without_nms(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    model = O2F(load_config("digits", ["model.num_classes=2", "model.rescore=true"]).model)
    model.eval()
    nn.init.normal_(model.head.cls_out.weight, std=0.5)
    nn.init.normal_(model.rescorer.keep.weight, std=1.0)
    _, expected, got = exported_without_nms(model, tmp_path / "rescore.onnx")
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), atol=1e-2)
