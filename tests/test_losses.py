"""Soft focal loss and the weighted GIoU loss on hand-made cases."""

import math

import pytest
import torch

from o2f.losses import centerness, joint_log_probs, soft_focal_loss, weighted_giou_loss


def sig(x):
    return 1 / (1 + math.exp(-x))


def bce(p, s):
    return -(s * math.log(p) + (1 - s) * math.log(1 - p))


def test_soft_focal_loss_three_points():
    # 3 points, 2 classes: point 0 certain positive of class 1, point 1 a soft anchor of
    # class 0 (label 0.3, weight 0.4), point 2 background.
    cls = torch.tensor([[-1.0, 2.0], [0.5, -0.5], [-3.0, 1.0]])
    obj = torch.tensor([1.0, -0.2, 0.0])
    labels = torch.tensor([1, 0, 2])
    soft = torch.tensor([1.0, 0.3, 0.0])
    weights = torch.tensor([1.0, 0.4, 0.0])
    p = [[sig(c) * sig(o) for c in row] for row, o in zip(cls.tolist(), obj.tolist(), strict=True)]

    def neg(x):
        return 0.75 * x**2 * bce(x, 0.0)

    expected = (neg(p[0][0]) + 1.0 * bce(p[0][1], 1.0)
                + 0.4 * bce(p[1][0], 0.3) + neg(p[1][1])
                + neg(p[2][0]) + neg(p[2][1]))
    loss = soft_focal_loss(cls, obj, labels, soft, weights)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # excluding point 2 (an ignore region) removes its two negative terms
    valid = torch.tensor([True, True, False])
    loss = soft_focal_loss(cls, obj, labels, soft, weights, valid)
    assert loss.item() == pytest.approx(expected - neg(p[2][0]) - neg(p[2][1]), rel=1e-5)


def test_log_space_is_finite_where_probabilities_underflow():
    cls = torch.tensor([[-60.0], [60.0]], dtype=torch.bfloat16)
    obj = torch.tensor([-60.0, 60.0], dtype=torch.bfloat16)
    log_p, log_1mp = joint_log_probs(cls, obj)
    assert log_p.dtype == torch.float32
    assert log_p[0].item() == pytest.approx(-120.0, rel=1e-4)
    assert torch.isfinite(log_1mp).all()
    loss = soft_focal_loss(cls.requires_grad_(), obj, torch.tensor([0, 0]),
                           torch.tensor([1.0, 1.0]), torch.ones(2))
    assert loss.item() == pytest.approx(120.0, rel=1e-3)  # -log p of the first point
    loss.backward()
    assert torch.isfinite(cls.grad).all()


def test_centerness_and_weighted_giou():
    ltrb = torch.tensor([[10.0, 20, 10, 5], [1.0, 1, 1, 1]])
    assert centerness(ltrb).tolist() == pytest.approx([math.sqrt(1.0 * 5 / 20), 1.0])
    target = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    pred = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5]])  # GIoU loss 0 and 0.5
    loss = weighted_giou_loss(pred, target, torch.tensor([1.0, 3.0]))
    assert loss.item() == pytest.approx((0 * 1 + 0.5 * 3) / 4)
