"""The levers against o2f's remaining duplicates (docs/ablation.md, "End to end in fact"):
the ceiling's schedule by iteration, the last phase without soft anchors and the 3D max
filter, the certain positive nearest the centre, the certain-positive ranking loss. Each
on hand-worked values; the release's recipe stays the default."""

import math
from types import SimpleNamespace

import pytest
import torch
from test_model import synthetic_image, tiny_config
from torch import nn

from o2f.assign import one_to_few, soft_label_ceiling, soft_label_ceiling_by_iter
from o2f.assign.common import Assignment, centerness
from o2f.assign.o2f import (
    assign_o2f,
    certain_box_weights,
    rank_weight_at,
    release_assignment,
    soft_weight_at,
)
from o2f.config import RECIPES, ConfigError, config_from_dict, load_config
from o2f.engine import soft_label_phase
from o2f.losses import DENSE_LOSSES, certain_rank_loss, soft_focal_loss
from o2f.model.detector import O2F, _dense_predictions
from o2f.model.head import BoxVote, MaxFilter3D


def test_ceiling_by_iteration_falls_to_its_end_at_the_given_fraction_and_holds():
    # 0.6 -> 0.0 over the first half: 0.6 - 1.2 * progress, then 0.
    assert soft_label_ceiling_by_iter(0.0, 0.6, 0.0, 0.5) == pytest.approx(0.6)
    assert soft_label_ceiling_by_iter(0.25, 0.6, 0.0, 0.5) == pytest.approx(0.3)
    assert soft_label_ceiling_by_iter(0.5, 0.6, 0.0, 0.5) == pytest.approx(0.0)
    assert soft_label_ceiling_by_iter(0.9, 0.6, 0.0, 0.5) == pytest.approx(0.0)
    # end_at = 1: a continuous version of the release's fall, 0.6 -> 0.2.
    assert soft_label_ceiling_by_iter(0.5, 0.6, 0.2, 1.0) == pytest.approx(0.4)
    assert soft_label_ceiling_by_iter(1.0, 0.6, 0.2, 1.0) == pytest.approx(0.2)
    assert soft_label_ceiling_by_iter(0.3, 0.6, 0.2, 0.0) == pytest.approx(0.2)


def test_default_schedule_is_the_releases_by_epoch():
    cfg = load_config("digits", ["train.epochs=5"])  # t: 0.6, 0.5, 0.4, 0.3, 0.2
    per_epoch = 10
    for it in range(50):
        t, soft = soft_label_phase(cfg, it // per_epoch, it, per_epoch)
        assert t == pytest.approx(soft_label_ceiling(it // per_epoch, 5))
        assert t == pytest.approx(0.6 - 0.1 * (it // per_epoch))
        assert soft


def test_iteration_schedule_and_the_last_phase_without_soft_anchors():
    cfg = load_config("digits", ["train.epochs=4", "model.t_schedule=iter",
                                 "model.t_end_at=0.5", "model.t_end=0.0",
                                 "model.o2o_from=0.75"])
    per_epoch = 10  # 40 iterations: t falls by 0.03 per iteration until iteration 20
    phases = [soft_label_phase(cfg, it // per_epoch, it, per_epoch) for it in range(40)]
    assert phases[0][0] == pytest.approx(0.6)
    assert phases[5][0] == pytest.approx(0.45)
    assert phases[19][0] == pytest.approx(0.03)
    assert all(t == pytest.approx(0.0) for t, _ in phases[20:])
    assert [soft for _, soft in phases] == [True] * 30 + [False] * 10
    with pytest.raises(ValueError, match="t_schedule"):
        soft_label_phase(load_config("digits", ["model.t_schedule=cosine"]), 0, 0, 10)


def _scene(overrides: tuple[str, ...] = ()):
    torch.manual_seed(0)
    cfg = load_config("digits", ["model.num_classes=3", *overrides]).model
    model = O2F(cfg)
    images = torch.randn(2, 3, 128, 160)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [40.0, 30.0, 120.0, 100.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[20.0, 20.0, 90.0, 110.0]]), "labels": torch.tensor([1])}]
    return model, images, targets


def test_without_soft_anchors_the_assignment_is_o2os():
    model, images, targets = _scene()
    with torch.no_grad():
        out = model.forward_dense(images)
    o2f = model.assign(out, targets, 0.4)
    last_phase = model.assign(out, targets, 0.4, soft_anchors=False)
    model.cfg.assign = "o2o"
    o2o = model.assign(out, targets, 0.4)
    for a, b, c in zip(o2f, last_phase, o2o, strict=True):
        assert int(a.positive.sum()) > int(b.positive.sum())  # o2f had soft anchors
        assert torch.equal(b.gt_index, c.gt_index)
        assert torch.equal(b.soft_labels, c.soft_labels)
        assert set(b.weights[b.positive].tolist()) == {1.0}
    # and the training forward passes the switch through to the loss
    model.cfg.assign = "o2f"
    model.train()
    a = model(images, targets, t=0.4, soft_anchors=False)
    model.cfg.assign = "o2o"
    b = model(images, targets, t=0.4)
    assert torch.allclose(a["loss_cls"], b["loss_cls"]) and torch.allclose(
        a["loss_box"], b["loss_box"])


def test_soft_weight_follows_the_ceiling_to_its_end_value():
    release = load_config("digits").model
    assert [soft_weight_at(t, release) for t in (0.6, 0.4, 0.2)] == [0.4, 0.4, 0.4]
    cfg = load_config("digits", ["model.soft_weight_end=2.0", "model.t_end=0.0"]).model
    # t 0.6 -> 0.0; weight 0.4 -> 2.0: at t = 0.45 a quarter of the way, 0.4 + 1.6 / 4
    assert soft_weight_at(0.6, cfg) == pytest.approx(0.4)
    assert soft_weight_at(0.45, cfg) == pytest.approx(0.8)
    assert soft_weight_at(0.0, cfg) == pytest.approx(2.0)
    assert soft_weight_at(0.9, cfg) == pytest.approx(0.4)  # held outside the schedule
    # held at 0.4 over the first half of t's fall (0.6 -> 0.3), then 0.4 -> 2.0 over the rest
    cfg.soft_weight_from = 0.5
    assert soft_weight_at(0.45, cfg) == pytest.approx(0.4)
    assert soft_weight_at(0.3, cfg) == pytest.approx(0.4)
    assert soft_weight_at(0.15, cfg) == pytest.approx(1.2)
    assert soft_weight_at(0.0, cfg) == pytest.approx(2.0)
    cfg.soft_weight_from = 1.0
    with pytest.raises(ValueError, match="soft_weight_from"):
        soft_weight_at(0.1, cfg)
    # and the assignment gives the soft anchors that weight
    model, images, targets = _scene(["model.soft_weight_end=2.0", "model.t_end=0.0"])
    with torch.no_grad():
        out = model.forward_dense(images)
    for t, weight in ((0.6, 0.4), (0.15, 1.6)):
        weights = {round(w, 4) for a in model.assign(out, targets, t)
                   for w in a.weights[a.positive].tolist()}
        assert weights == {1.0, weight}


def test_certain_positive_by_quality_times_centerness():
    # One gt (0, 0, 64, 64), centre (32, 32), two stride-8 cells predicting it exactly.
    # A at (21, 28): prob 0.9, quality 0.9^0.2 = 0.979, centerness sqrt(21/43 * 28/36) = 0.616
    # B at (28, 28): prob 0.8, quality 0.8^0.2 = 0.956, centerness 28/36 = 0.778
    # By quality A is the certain positive; by quality x centerness B is (0.603 < 0.744).
    points = torch.tensor([[21.0, 28.0], [28.0, 28.0]])
    gt = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    args = (points, torch.full((2,), 8.0), torch.tensor([[0.9], [0.8]]), gt.repeat(2, 1), gt,
            torch.tensor([0]))
    release = one_to_few(*args, num_classes=1, t=0.3)
    centred = one_to_few(*args, num_classes=1, t=0.3, certain_by="centred")
    assert release.soft_labels.tolist() == pytest.approx([1.0, 0.3])
    assert release.weights.tolist() == pytest.approx([1.0, 0.4])
    assert centred.soft_labels.tolist() == pytest.approx([0.3, 1.0])
    assert centred.weights.tolist() == pytest.approx([0.4, 1.0])
    assert torch.equal(release.box_targets, centred.box_targets)  # picks unchanged
    in_level = one_to_few(*args, num_classes=1, t=0.3, certain_by="centred_in_level")
    assert in_level.soft_labels.tolist() == pytest.approx([0.3, 1.0])
    # C, a stride-16 cell at (40, 40) with prob 0.95, has the best quality (0.990) and
    # centerness 24/40 = 0.6: by quality x centerness B still wins (0.594 < 0.744); on the
    # level of the best-quality pick C is the only cell, so it is the certain positive.
    points3 = torch.cat([points, torch.tensor([[40.0, 40.0]])])
    args3 = (points3, torch.tensor([8.0, 8.0, 16.0]), torch.tensor([[0.9], [0.8], [0.95]]),
             gt.repeat(3, 1), gt, torch.tensor([0]))
    by = {rule: one_to_few(*args3, num_classes=1, t=0.3, certain_by=rule).weights.tolist()
          for rule in ("quality", "centred", "centred_in_level")}
    assert by == {"quality": pytest.approx([0.4, 0.4, 1.0]),
                  "centred": pytest.approx([0.4, 1.0, 0.4]),
                  "centred_in_level": pytest.approx([0.4, 0.4, 1.0])}
    with pytest.raises(ValueError, match="certain_by"):
        one_to_few(*args, num_classes=1, t=0.3, certain_by="centre")
    assert load_config("digits").model.certain_by == "quality"


def _two_cells(probs: list[float], box_bottoms: list[float]) -> tuple:
    """one_to_few's inputs for one gt (0, 0, 64, 64) and two stride-8 cells A (28, 28) and
    B (36, 36) of the given class probs, predicting (0, 0, 64, bottom): IoU bottom / 64."""
    gt = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    boxes = torch.tensor([[0.0, 0.0, 64.0, b] for b in box_bottoms])
    return (torch.tensor([[28.0, 28.0], [36.0, 36.0]]), torch.full((2,), 8.0),
            torch.tensor([[p] for p in probs]), boxes, gt, torch.tensor([0]))


def _two_cell_prediction(probs: list[float], box_bottoms: list[float]) -> tuple:
    """(the DensePrediction fields assign_o2f reads, gt boxes, gt labels) of
    :func:`_two_cells`, without a second head branch."""
    points, strides, scores, boxes, gt, labels = _two_cells(probs, box_bottoms)
    pred = SimpleNamespace(points=points, strides=strides, scores=scores, boxes=boxes,
                           level_shapes=None, one_to_many=None)
    return pred, gt, labels


def test_certain_positive_by_score():
    # One gt (0, 0, 64, 64), two cells. A: prob 0.9, predicted box (0, 0, 64, 38.4), IoU 0.6,
    # quality 0.9^0.2 * 0.6^0.8 = 0.651. B: prob 0.7, box (0, 0, 64, 57.6), IoU 0.9,
    # quality 0.7^0.2 * 0.9^0.8 = 0.856. By quality B is certain; by score A is, and B's
    # soft label is then its prob over the best soft prob (its own) times t.
    args = _two_cells([0.9, 0.7], [38.4, 57.6])
    release = one_to_few(*args, num_classes=1, t=0.3)
    by_score = one_to_few(*args, num_classes=1, t=0.3, certain_by="score")
    assert release.soft_labels.tolist() == pytest.approx([0.3, 1.0])
    assert release.weights.tolist() == pytest.approx([0.4, 1.0])
    assert by_score.soft_labels.tolist() == pytest.approx([1.0, 0.3])
    assert by_score.weights.tolist() == pytest.approx([1.0, 0.4])
    assert torch.equal(release.box_targets, by_score.box_targets)  # picks unchanged


def test_certain_positive_by_iou_alone():
    # One gt (0, 0, 64, 64). A: prob 0.9, IoU 0.8, quality 0.9^0.2 * 0.8^0.8 = 0.819.
    # B: prob 0.01 (a soft anchor pushed down), IoU 0.9, quality 0.01^0.2 * 0.9^0.8 = 0.362.
    # By quality A stays certain on its score; by IoU alone B, the better box, is.
    args = _two_cells([0.9, 0.01], [51.2, 57.6])
    release = one_to_few(*args, num_classes=1, t=0.3)
    by_iou = one_to_few(*args, num_classes=1, t=0.3, certain_by="iou")
    assert release.weights.tolist() == pytest.approx([1.0, 0.4])
    assert by_iou.weights.tolist() == pytest.approx([0.4, 1.0])
    assert by_iou.soft_labels.tolist() == pytest.approx([0.3, 1.0])
    assert torch.equal(release.box_targets, by_iou.box_targets)  # picks unchanged


def test_certain_positive_leader_is_the_best_scored_of_the_near_best_boxes():
    # One gt (0, 0, 64, 64). A: prob 0.5, IoU 0.9, quality 0.5^0.2 * 0.9^0.8 = 0.800.
    # B: prob 0.55, IoU 0.86, quality 0.55^0.2 * 0.86^0.8 = 0.786. By quality A is certain;
    # B's quality is within 0.05 of A's, so the leader rule takes the better-scored B; with
    # a margin of 0.01 B is too far from the best, and A stays certain.
    args = _two_cells([0.5, 0.55], [57.6, 55.04])
    release = one_to_few(*args, num_classes=1, t=0.3)
    leader = one_to_few(*args, num_classes=1, t=0.3, certain_by="leader")
    narrow = one_to_few(*args, num_classes=1, t=0.3, certain_by="leader",
                        certain_margin=0.01)
    assert release.weights.tolist() == pytest.approx([1.0, 0.4])
    assert leader.weights.tolist() == pytest.approx([0.4, 1.0])
    assert leader.soft_labels.tolist() == pytest.approx([0.3, 1.0])
    assert narrow.weights.tolist() == pytest.approx([1.0, 0.4])
    assert torch.equal(release.box_targets, leader.box_targets)  # picks unchanged
    # The best score alone is not enough: B at 0.9 with IoU 0.6 (quality 0.651) is outside
    # the margin (certain_by=score would take it).
    far = _two_cells([0.5, 0.9], [57.6, 38.4])
    assert one_to_few(*far, num_classes=1, t=0.3, certain_by="leader").weights.tolist() == \
        pytest.approx([1.0, 0.4])
    assert one_to_few(*far, num_classes=1, t=0.3, certain_by="score").weights.tolist() == \
        pytest.approx([0.4, 1.0])
    with pytest.raises(ValueError, match="certain_margin"):
        one_to_few(*args, num_classes=1, t=0.3, certain_by="leader", certain_margin=-0.1)


def test_certain_by_leader_and_its_margin_reach_the_assignment_from_the_config():
    pred, gt, labels = _two_cell_prediction([0.5, 0.55], [57.6, 55.04])
    cfg = load_config("digits", ["model.num_classes=1", "model.certain_by=leader"]).model
    assert assign_o2f(pred, gt, labels, cfg, t=0.3).weights.tolist() == pytest.approx([0.4, 1.0])
    cfg = load_config("digits", ["model.num_classes=1", "model.certain_by=leader",
                                 "model.certain_margin=0.01"]).model
    assert assign_o2f(pred, gt, labels, cfg, t=0.3).weights.tolist() == pytest.approx([1.0, 0.4])


def test_max_filter_takes_the_maximum_over_space_and_neighbouring_levels():
    mf = MaxFilter3D(4)
    with torch.no_grad():  # conv = identity, so the filter's arithmetic shows
        mf.conv.weight.zero_()
        mf.conv.bias.zero_()
        for c in range(4):
            mf.conv.weight[c, c, 1, 1] = 1.0
    mf.norm = nn.Identity()
    p3 = torch.zeros(1, 4, 4, 4)
    p3[0, :, 1, 1] = 5.0
    p4 = torch.zeros(1, 4, 2, 2)
    p5 = torch.full((1, 4, 1, 1), 7.0)  # two levels away from P3: out of its reach
    out3, out4, out5 = mf([p3, p4, p5])
    expected3 = torch.zeros(4, 4)
    expected3[0:3, 0:3] = 5.0  # the 3x3 window around the peak
    expected3[1, 1] = 10.0  # plus the input itself
    assert torch.equal(out3[0, 0], expected3)
    # P4 sees P3 resampled to 2x2 (the peak's bilinear share: 5 / 4) and P5 (7 everywhere)
    assert torch.allclose(out4, torch.full_like(out4, 7.0))
    # P5 sees P4 (P3's 1.25 after resampling, and 0s) and itself: 7 + 7
    assert torch.allclose(out5, torch.full_like(out5, 14.0))
    out3_alone, = mf([p3])
    p4_alone, _ = mf([p3, p4])
    assert torch.equal(out3_alone, p4_alone)  # P3's neighbours: P4 below 5 changes nothing
    _, out4_no_p5 = mf([p3, p4])
    assert torch.allclose(out4_no_p5, torch.full_like(out4_no_p5, 1.25))


def test_max_filter_is_an_option_of_the_head_and_changes_only_the_objectness():
    torch.manual_seed(0)
    plain = O2F(load_config("digits").model).eval()
    torch.manual_seed(0)
    filtered = O2F(load_config("digits", ["model.max_filter=true"]).model).eval()
    assert plain.head.max_filter is None and isinstance(filtered.head.max_filter, MaxFilter3D)
    extra = set(filtered.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("head.max_filter.") for k in extra)
    filtered.load_state_dict({**filtered.state_dict(), **plain.state_dict()})
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = plain.forward_dense(x), filtered.forward_dense(x)
    assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.box_ltrb, b.box_ltrb)
    assert not torch.allclose(a.obj_logits, b.obj_logits)


def exported_without_nms(model: O2F, path) -> tuple[set, dict, dict]:
    """Export ``model`` (dynamic shapes) to ``path``, check that the graph has no
    NonMaxSuppression node; return its ops and the eager and ONNX Runtime detections of one
    130 x 150 image."""
    pytest.importorskip("onnxruntime")
    from o2f.export import OnnxDetector, export_onnx, onnx_ops

    path = export_onnx(model, path, size=(128, 160), dynamic=True)
    ops = onnx_ops(path)
    assert "NonMaxSuppression" not in ops
    images = [torch.rand(3, 130, 150)]
    with torch.no_grad():
        expected = model(images)[0]
    return ops, expected, OnnxDetector(path)(images)[0]


def test_exported_graph_with_the_max_filter_has_no_nms(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    model = O2F(load_config("digits", ["model.max_filter=true", "model.num_classes=2"]).model)
    model.eval()
    nn.init.normal_(model.head.cls_out.weight, std=0.5)
    ops, expected, got = exported_without_nms(model, tmp_path / "mf.onnx")
    assert "MaxPool" in ops
    np.testing.assert_allclose(got["scores"], expected["scores"].numpy(), atol=1e-4)


def test_box_vote_moves_a_neighbours_box_to_the_cell_and_ignores_cells_off_the_map():
    vote = BoxVote(8)
    assert vote.logits.bias.softmax(0)[4].item() == pytest.approx(math.exp(4) / (math.exp(4) + 8))
    ltrb = torch.rand(1, 4, 3, 4) * 10
    feat = torch.rand(1, 8, 3, 4)
    with torch.no_grad():
        vote.logits.bias.zero_()
        vote.logits.bias[5] = 50.0  # (dx, dy) = (1, 0): the right neighbour
        out = vote(feat, ltrb, 8)
    # cell (1, 1) takes cell (1, 2)'s box, seen from a point 8 px to its left
    torch.testing.assert_close(out[0, :, 1, 1], ltrb[0, :, 1, 2] + torch.tensor([-8.0, 0, 8, 0]))
    # on the right edge the three neighbours to the right are off the map: the 6 others
    # share the weight equally
    others = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0)]
    expected = torch.stack([ltrb[0, :, 1 + dy, 3 + dx] + torch.tensor([-dx, -dy, dx, dy]) * 8.0
                            for dy, dx in others]).mean(0)
    torch.testing.assert_close(out[0, :, 1, 3], expected)


def test_box_vote_is_an_option_of_the_head_and_exports_without_nms(tmp_path):
    import numpy as np

    torch.manual_seed(0)
    plain = O2F(load_config("digits", ["model.num_classes=2"]).model).eval()
    torch.manual_seed(0)
    voted = O2F(load_config("digits", ["model.num_classes=2", "model.box_vote=true"]).model)
    voted.eval()
    extra = set(voted.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("head.box_vote.") for k in extra)
    voted.load_state_dict({**voted.state_dict(), **plain.state_dict()})
    nn.init.normal_(voted.head.box_vote.logits.weight, std=0.5)
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = plain.forward_dense(x), voted.forward_dense(x)
    assert torch.equal(a.cls_logits, b.cls_logits) and torch.equal(a.obj_logits, b.obj_logits)
    assert not torch.allclose(a.box_ltrb, b.box_ltrb)
    _, expected, got = exported_without_nms(voted, tmp_path / "vote.onnx")
    np.testing.assert_allclose(got["boxes"], expected["boxes"].numpy(), atol=1e-2)


def test_soft_push_through_objectness_only():
    # One soft anchor (s = 0.2, w = 0.4) of class 0, one class: its term is
    # -w [s log p + (1 - s) log(1 - p)], p = sigmoid(a) sigmoid(b). With the push through
    # the objectness only, the classification logit a gets only the first part's gradient,
    # -w s (1 - sigmoid(a)); the objectness logit b gets the whole term's.
    a0, b0, s, w = 0.5, 1.0, 0.2, 0.4
    sa, sb = torch.sigmoid(torch.tensor(a0)), torch.sigmoid(torch.tensor(b0))
    p = sa * sb
    grad_a_obj_only = -w * s * (1 - sa)
    grad_a_joint = -w * (s * (1 - sa) - (1 - s) * p * (1 - sa) / (1 - p))
    grad_b = -w * (s * (1 - sb) - (1 - s) * p * (1 - sb) / (1 - p))
    for obj_only, grad_a in ((True, grad_a_obj_only), (False, grad_a_joint)):
        a = torch.tensor([[a0]], requires_grad=True)
        b = torch.tensor([b0], requires_grad=True)
        loss = soft_focal_loss(a, b, torch.tensor([0]), torch.tensor([s]), torch.tensor([w]),
                               push_obj_only=obj_only)
        loss.backward()
        assert a.grad.item() == pytest.approx(grad_a.item(), rel=1e-5)
        assert b.grad.item() == pytest.approx(grad_b.item(), rel=1e-5)
    # the objective the assignment names runs the same loss with the option on
    a = torch.tensor([[a0]], requires_grad=True)
    fake = SimpleNamespace(labels=torch.tensor([0]), soft_labels=torch.tensor([s]),
                           weights=torch.tensor([w]))
    DENSE_LOSSES["soft_focal_obj"](a, torch.tensor([b0]), fake, None)["loss_cls"].backward()
    assert a.grad.item() == pytest.approx(grad_a_obj_only.item(), rel=1e-5)
    # the option reaches the loss by its name
    model, images, targets = _scene(["model.soft_push=obj"])
    with torch.no_grad():
        out = model.forward_dense(images)
    assert {a.loss for a in model.assign(out, targets, 0.3)} == {"soft_focal_obj"}
    assert load_config("digits").model.soft_push == "joint"
    model.cfg.soft_push = "cls"
    with pytest.raises(ValueError, match="soft_push"):
        model.assign(out, targets, 0.3)


def test_certain_rank_loss_on_hand_values_and_per_image_groups():
    # Two images of 4 points, one class. Image 0, gt 0: certain at point 1 (p = 0.8), soft
    # anchor at 2 (p = 0.4). Image 1, gt 0: certain at point 4 (p = 0.5), soft anchors at
    # 5 and 6 (p = 0.25 each). Each gt's term is -log(p_c / sum of its group's p); the
    # loss is their mean: (-log(0.8 / 1.2) - log(0.5 / 1.0)) / 2.
    probs = torch.tensor([0.1, 0.8, 0.4, 0.1, 0.5, 0.25, 0.25, 0.1])
    obj = torch.full((8,), 20.0)  # sigmoid(obj) = 1: p is the class probability
    cls = torch.logit(probs).reshape(8, 1).requires_grad_(True)
    labels = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1])
    gt_index = torch.tensor([-1, 0, 0, -1, 0, 0, 0, -1])
    soft = torch.tensor([0, 1.0, 0.3, 0, 1.0, 0.2, 0.2, 0])
    weights = torch.tensor([0, 1.0, 0.4, 0, 1.0, 0.4, 0.4, 0])
    a = Assignment(labels, torch.zeros(8, 4), soft, weights, gt_index, points_per_image=4)
    loss = certain_rank_loss(cls, obj, a)
    expected = (-math.log(0.8 / 1.2) - math.log(0.5 / 1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The gradient raises the certain positive's log p by (1 - q_c) and lowers each soft
    # anchor's by q_j (q = p / group sum), /2 for the mean: it sums to 0 within a group.
    loss.backward()
    dlogp_dlogit = 1 - probs  # d log sigmoid(a) / da
    q = torch.tensor([0, 0.8 / 1.2, 0.4 / 1.2, 0, 0.5, 0.25, 0.25, 0])
    certain = soft == 1
    expected_grad = torch.where(certain, -(1 - q), q) / 2 * dlogp_dlogit * (labels == 0)
    torch.testing.assert_close(cls.grad[:, 0], expected_grad, rtol=1e-4, atol=1e-6)
    # Without the image split the two gts 0 would be one group of five: a different loss.
    merged = Assignment(labels, torch.zeros(8, 4), soft, weights, gt_index)
    assert certain_rank_loss(cls.detach(), obj, merged).item() != pytest.approx(expected)


def test_rank_weight_follows_the_ceiling_and_reaches_the_objective():
    cfg = load_config("digits", ["model.rank_weight=2.0"]).model  # t 0.6 -> 0.2
    assert [rank_weight_at(t, cfg) for t in (0.6, 0.4, 0.2, 0.0)] == pytest.approx(
        [0.0, 1.0, 2.0, 2.0])
    assert load_config("digits").model.rank_weight == 0.0
    model, images, targets = _scene(["model.rank_weight=2.0"])
    out = model.forward_dense(images)
    assigned = model.assign(out, targets, 0.4)
    assert [a.loss_options["rank_weight"] for a in assigned] == pytest.approx([1.0, 1.0])
    losses = model.detection_losses(out, targets, assigned)
    a = Assignment.cat(assigned)
    expected = certain_rank_loss(out.cls_logits.reshape(-1, 3), out.obj_logits.reshape(-1), a)
    assert losses["loss_rank"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() > 0  # the scene's gts have soft anchors
    assert "loss_rank" not in model.losses(out, targets, 0.6)  # weight 0 at t_start
    model.cfg.rank_weight = -1.0
    with pytest.raises(ValueError, match="rank_weight"):
        model.assign(out, targets, 0.4)


def test_recipe_sets_its_keys_later_keys_win_and_a_saved_config_reloads():
    release = load_config("digits").model
    strict = load_config("digits", ["model.recipe=strict-e2e"]).model
    assert release.recipe == "release" and strict.recipe == "strict-e2e"
    changed = {k for k in RECIPES["strict-e2e"] if getattr(strict, k) != getattr(release, k)}
    assert changed == set(RECIPES["strict-e2e"])  # every key of the recipe moves
    for key, value in RECIPES["strict-e2e"].items():
        assert getattr(strict, key) == value
    # a key set after the recipe wins, also through a saved and reloaded config
    cfg = load_config("digits", ["model.recipe=strict-e2e", "model.t_end=0.1"])
    assert cfg.model.t_end == 0.1 and cfg.model.soft_weight_end == 3.0
    reloaded = config_from_dict(cfg.to_dict()).model
    assert (reloaded.recipe, reloaded.t_end, reloaded.soft_weight_end) == ("strict-e2e", 0.1, 3.0)
    # back to the release's recipe
    back = load_config("digits", ["model.recipe=strict-e2e", "model.recipe=release"]).model
    assert all(getattr(back, k) == getattr(release, k) for k in RECIPES["strict-e2e"])
    with pytest.raises(ConfigError, match="strict-e2e"):
        load_config("digits", ["model.recipe=strict"])


def test_certain_weight_weighs_the_certain_positives_only():
    # The two-cell case above: A certain (prob 0.9), B a soft anchor; the weight of the
    # certain positive's term becomes 2, the soft anchor's stays 0.4.
    args = _two_cells([0.9, 0.01], [51.2, 57.6])
    heavy = one_to_few(*args, num_classes=1, t=0.3, certain_weight=2.0)
    assert heavy.weights.tolist() == pytest.approx([2.0, 0.4])
    assert heavy.soft_labels.tolist() == pytest.approx([1.0, 0.3])
    model, images, targets = _scene(["model.certain_weight=2.0"])
    with torch.no_grad():
        out = model.forward_dense(images)
    for a in model.assign(out, targets, 0.4):
        certain = a.soft_labels == 1
        assert certain.any() and bool((a.weights[certain] == 2.0).all())
        assert bool((a.weights[a.positive & ~certain] == 0.4).all())
    assert load_config("digits").model.certain_weight == 1.0


def test_certain_box_weight_scales_the_certain_positives_box_loss_only():
    # Two cells: A (28, 28) certain (prob 0.9), B (36, 36) a soft anchor. The gt
    # (0, 0, 64, 72) gives A the target (28, 28, 36, 44), centerness sqrt(28/36 * 28/44)
    # = 0.7035, and B (36, 36, 28, 36), sqrt(28/36) = 0.8819.
    gt_args = list(_two_cells([0.9, 0.01], [51.2, 57.6]))
    gt_args[4] = torch.tensor([[0.0, 0.0, 64.0, 72.0]])
    a = one_to_few(*gt_args, num_classes=1, t=0.3)
    assert a.soft_labels.tolist() == pytest.approx([1.0, 0.3])
    assert certain_box_weights(a, 3.0).tolist() == pytest.approx([3 * 0.7035, 0.8819],
                                                                 abs=1e-4)
    assert certain_box_weights(a, 1.0).tolist() == pytest.approx([0.7035, 0.8819], abs=1e-4)
    # through the model: the release leaves the weighting to the detector (centerness);
    # the option changes the box loss and nothing else
    model, images, targets = _scene()
    model.train()
    assert all(a.box_weights is None for a in model.assign(
        model.forward_dense(images), targets, 0.4))
    torch.manual_seed(1)
    release = model(images, targets, t=0.4)
    model.cfg.certain_box_weight = 3.0
    for a in model.assign(model.forward_dense(images), targets, 0.4):
        certain, soft = a.soft_labels == 1, a.positive & (a.soft_labels < 1)
        assert certain.any() and soft.any()
        assert torch.allclose(a.box_weights[certain], 3 * centerness(a.box_targets[certain]))
        assert torch.allclose(a.box_weights[soft], centerness(a.box_targets[soft]))
        assert bool((a.box_weights[~a.positive] == 0).all())
    heavy = model(images, targets, t=0.4)
    assert torch.equal(heavy["loss_cls"], release["loss_cls"])
    assert not torch.isclose(heavy["loss_box"], release["loss_box"])
    assert load_config("digits").model.certain_box_weight == 1.0


def test_certain_label_iou_labels_the_peak_by_its_box():
    # The two-cell case: A certain (prob 0.9, box bottom 51.2: IoU 0.8), B a soft anchor.
    # With certain_label=iou A's label is its IoU, 0.8; B's soft label and both weights are
    # the release's, and A is still marked certain (the box weight and the ranking loss
    # find it by the mark, not by a label of 1).
    args = _two_cells([0.9, 0.01], [51.2, 57.6])
    release = one_to_few(*args, num_classes=1, t=0.3)
    by_iou = one_to_few(*args, num_classes=1, t=0.3, certain_label="iou")
    assert release.soft_labels.tolist() == pytest.approx([1.0, 0.3])
    assert by_iou.soft_labels.tolist() == pytest.approx([0.8, 0.3])
    assert torch.equal(by_iou.weights, release.weights)
    assert by_iou.certain.tolist() == release.certain.tolist() == [True, False]
    assert certain_box_weights(by_iou, 2.0)[0] == 2 * certain_box_weights(by_iou, 1.0)[0]
    with pytest.raises(ValueError, match="certain_label"):
        one_to_few(*args, num_classes=1, t=0.3, certain_label="quality")
    model, images, targets = _scene(["model.certain_label=iou"])
    with torch.no_grad():
        out = model.forward_dense(images)
    for a in model.assign(out, targets, 0.4):
        assert int(a.certain.sum()) == int((a.gt_index.unique() >= 0).sum())  # one per gt
        assert bool((a.soft_labels[a.certain] < 1).all())
    assert load_config("digits").model.certain_label == "one"


def test_soft_weight_top_spares_the_soft_anchor_that_outscores_its_certain_positive():
    # One gt (0, 0, 64, 64), two cells. A: prob 0.9, IoU 0.6, quality 0.651; B: prob 0.7,
    # IoU 0.9, quality 0.856: B is certain, A a soft anchor scoring above it (the pair trades
    # the role): A keeps the spared weight while soft anchors weigh 3.
    args = _two_cells([0.9, 0.7], [38.4, 57.6])
    heavy = one_to_few(*args, num_classes=1, t=0.1, soft_weight=3.0)
    spared = one_to_few(*args, num_classes=1, t=0.1, soft_weight=3.0, top_soft_weight=0.4)
    assert heavy.weights.tolist() == pytest.approx([3.0, 1.0])
    assert spared.weights.tolist() == pytest.approx([0.4, 1.0])
    assert torch.equal(heavy.soft_labels, spared.soft_labels)  # labels unchanged
    # A at prob 0.5 (quality 0.5^0.2 * 0.6^0.8 = 0.578) scores under the certain B: not spared
    args = _two_cells([0.5, 0.7], [38.4, 57.6])
    below = one_to_few(*args, num_classes=1, t=0.1, soft_weight=3.0, top_soft_weight=0.4)
    assert below.weights.tolist() == pytest.approx([3.0, 1.0])


def test_soft_weight_top_reaches_the_assignment_from_the_config():
    keys = ["model.soft_weight_end=3.0", "model.t_end=0.0", "model.soft_weight_top=0.4"]
    model, images, targets = _scene(keys)
    with torch.no_grad():
        out = model.forward_dense(images)
    spared = 0
    preds = _dense_predictions(out)
    for a, pred in zip(model.assign(out, targets, 0.0), preds, strict=True):
        soft = a.positive & ~a.certain
        prob = pred.scores.gather(1, a.labels.clamp(0, 2)[:, None])[:, 0]  # 3 classes
        for g in a.gt_index[a.positive].unique():
            group = a.positive & (a.gt_index == g)
            top = soft & group & (prob >= prob[group].max())
            assert bool((a.weights[top] == 0.4).all())
            assert bool((a.weights[soft & group & ~top] == 3.0).all())
            spared += int(top.sum())
    assert spared > 0  # the untrained scene has soft anchors above their certain positive
    assert load_config("digits").model.soft_weight_top is None


def test_soft_cap_weighs_only_the_soft_anchors_at_or_above_it():
    # One gt, A certain by quality (0.800 against 0.786), B a soft anchor scoring 0.55. With
    # a cap of 0.3 B is above it and takes the heavy weight; with a cap of 0.6 it is under
    # it and keeps the weight below the cap; the certain positive is never touched.
    args = _two_cells([0.5, 0.55], [57.6, 55.04])
    kw = dict(num_classes=1, t=0.1, soft_weight=3.0, below_cap_weight=0.4)
    assert one_to_few(*args, **kw).weights.tolist() == pytest.approx([1.0, 3.0])
    assert one_to_few(*args, soft_cap=0.3, **kw).weights.tolist() == pytest.approx([1.0, 3.0])
    capped = one_to_few(*args, soft_cap=0.6, **kw)
    assert capped.weights.tolist() == pytest.approx([1.0, 0.4])
    assert capped.soft_labels.tolist() == pytest.approx([1.0, 0.1])  # labels unchanged
    # Through the config: strict-e2e at three quarters of t's fall weighs soft anchors 1.7;
    # under the cap they keep model.soft_weight.
    pred, gt, labels = _two_cell_prediction([0.5, 0.55], [57.6, 55.04])
    for cap, weight in ((0.3, 1.7), (0.6, 0.4)):
        cfg = load_config("digits", ["model.num_classes=1", "model.recipe=strict-e2e",
                                     f"model.soft_cap={cap}"]).model
        assert assign_o2f(pred, gt, labels, cfg, t=0.15).weights.tolist() == \
            pytest.approx([1.0, weight])


def test_aux_branch_assigns_the_release_recipe_at_the_same_point_of_training():
    # strict-e2e (t 0.6 -> 0, soft weight 0.4 held to half of t's fall, then -> 3.0) at
    # t = 0.15: three quarters of the fall, so the inference branch's soft anchor weighs
    # 0.4 + 2.6 * 0.5 = 1.7 with label 0.15; the release's ceiling at three quarters of its
    # fall (0.6 -> 0.2) is 0.3, and its soft anchors weigh 0.4.
    cfg = load_config("digits", ["model.num_classes=1", "model.recipe=strict-e2e",
                                 "model.certain_label=iou", "model.aux_branch=release"]).model
    pred, gt, labels = _two_cell_prediction([0.5, 0.55], [57.6, 55.04])
    assert soft_weight_at(0.15, cfg) == pytest.approx(1.7)
    aux = release_assignment(pred, gt, labels, cfg, t=0.15)
    assert aux.weights.tolist() == pytest.approx([1.0, 0.4])
    assert aux.soft_labels.tolist() == pytest.approx([1.0, 0.3])  # label 1, not the IoU
    main = assign_o2f(pred, gt, labels, cfg, t=0.15)
    assert main.weights.tolist() == pytest.approx([1.0, 1.7])
    assert main.soft_labels.tolist() == pytest.approx([0.9, 0.15])
    assert main.aux is None  # no second branch's outputs: nothing to assign
    pred.one_to_many = pred
    assert assign_o2f(pred, gt, labels, cfg, t=0.15).aux.weights.tolist() == \
        pytest.approx([1.0, 0.4])


def test_aux_branch_trains_a_second_branch_and_leaves_the_features_to_it():
    model = O2F(tiny_config(aux_branch="release", recipe="strict-e2e", t_end=0.0,
                            soft_weight_end=3.0, soft_weight_from=0.5)).train()
    assert model.head.one_to_many is not None
    image, target = synthetic_image()
    batch = model.preprocess([image])[0]
    out = model.forward_dense(batch)
    (a,) = model.assign(out, [target], t=0.3)
    assert a.aux is not None and a.aux.soft_labels.max() == 1.0
    losses = model.detection_losses(out, [target], [a])
    assert {"loss_cls", "loss_box", "loss_cls_aux", "loss_box_aux"} <= set(losses)
    a.aux = None  # the inference branch's losses alone reach neither backbone nor neck
    sum(model.detection_losses(out, [target], [a]).values()).backward()
    features = [*model.backbone.parameters(), *model.neck.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in features)
    assert model.head.cls_out.weight.grad.abs().sum() > 0
    model.eval()
    assert model.forward_dense(batch).one_to_many is None
    with pytest.raises(ValueError, match="aux_branch"):
        O2F(tiny_config(aux_branch="release", assign="o2m"))
    with pytest.raises(ValueError, match="aux_branch"):
        model.cfg.aux_branch = "o2m"
        model.assign(out, [target], t=0.3)
