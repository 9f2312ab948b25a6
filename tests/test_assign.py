"""The one-to-few assignment, checked on hand-made cases and against a per-gt loop."""

import math

import pytest
import torch
from reference_assign import one_to_few_loop

from o2f.assign import (
    candidate_mask,
    level_ranges,
    one_to_few,
    one_to_many,
    soft_label_ceiling,
)

C = 3  # classes in the hand-made cases


def run(points, strides, prob, pred, gt, labels, **kw):
    kw = {"num_classes": C, "t": 0.5, **kw}
    return one_to_few(torch.tensor(points, dtype=torch.float32),
                      torch.tensor(strides, dtype=torch.float32),
                      torch.tensor(prob, dtype=torch.float32),
                      torch.tensor(pred, dtype=torch.float32),
                      torch.tensor(gt, dtype=torch.float32), torch.tensor(labels), **kw)


def q(prob, iou, alpha=0.8):
    return prob ** (1 - alpha) * iou ** alpha


def test_candidate_region_is_centre_square_clipped_to_box_on_every_level():
    gt = torch.tensor([[0.0, 0.0, 100.0, 40.0]])  # centre (50, 20)
    points = torch.tensor([
        [40.0, 10.0],  # stride 8: square (38, 62) x (8, 32) -> inside
        [62.0, 20.0],  # on the square's edge -> outside (strict)
        [37.0, 20.0],  # left of the square -> outside
        [90.0, 35.0],  # stride 8: outside the square
        [90.0, 35.0],  # stride 64: square covers the whole box -> inside (no size ranges)
        [100.0, 20.0],  # stride 64, on the box edge -> outside (strict)
        [50.0, 40.0],  # stride 64, on the box's bottom edge -> outside
    ])
    strides = torch.tensor([8.0, 8, 8, 8, 64, 64, 64])
    mask = candidate_mask(points, strides, gt, radius=1.5)[:, 0]
    assert mask.tolist() == [True, False, False, False, True, False, False]


def test_topk_limited_by_candidates_with_positive_iou():
    gt = [[0.0, 0.0, 60.0, 60.0]]
    points = [[10.0, 10], [20, 20], [30, 30], [40, 40], [50, 50]]
    prob = [[1.0, 0, 0]] * 5
    pred = [[0.0, 0, 60, 30],  # iou 0.5
            [0.0, 0, 60, 60],  # iou 1.0
            [100.0, 100, 110, 110],  # iou 0 (disjoint)
            [100.0, 100, 110, 110],
            [100.0, 100, 110, 110]]
    a = run(points, [64.0] * 5, prob, pred, gt, [0], topk=7)
    # k = min(7, 2 points with IoU > 0) = 2: the certain positive is point 1 (IoU 1).
    assert a.gt_index.tolist() == [0, 0, -1, -1, -1]
    assert a.soft_labels.tolist() == [pytest.approx(0.5), 1.0, 0, 0, 0]  # 1/1 * t
    assert a.weights.tolist() == [pytest.approx(0.4), 1.0, 0, 0, 0]
    assert a.labels.tolist() == [0, 0, C, C, C]
    # topk smaller than the candidates: only the best one survives
    a = run(points, [64.0] * 5, prob, pred, gt, [0], topk=1)
    assert a.gt_index.tolist() == [-1, 0, -1, -1, -1]


def test_point_in_two_regions_goes_to_the_gt_where_quality_is_highest():
    gts = [[0.0, 0, 40, 40], [10.0, 10, 50, 50]]
    points = [[25.0, 25], [5.0, 5], [45.0, 45]]
    prob = [[0.5, 0.8, 0], [0.5, 0.0, 0], [0.0, 0.7, 0]]
    pred = [[10.0, 10, 50, 50],  # IoU with gt1 = 1, with gt0 = 900/2300
            [0.0, 0, 40, 40], [10.0, 10, 50, 50]]
    a = run(points, [64.0] * 3, prob, pred, gts, [0, 1], topk=7)
    q0, q1 = q(0.5, 900 / 2300), q(0.8, 1.0)
    assert q1 > q0
    assert a.gt_index.tolist() == [1, 0, 1]
    assert a.labels.tolist() == [1, 0, 1]
    # gt1's points: 0 (quality 1.0, certain) and 2 (soft, its only soft anchor -> t)
    assert a.soft_labels.tolist() == [1.0, 1.0, pytest.approx(0.5)]
    assert a.box_targets[0].tolist() == [15.0, 15.0, 25.0, 25.0]


def test_gt_that_loses_all_its_picks_gets_no_positive():
    gts = [[0.0, 0, 40, 40], [0.0, 0, 40, 40.5]]
    points = [[20.0, 20]]
    prob = [[0.9, 0.9, 0]]
    pred = [[0.0, 0, 40, 40.5]]  # better match for gt 1
    a = run(points, [64.0], prob, pred, gts, [0, 1], topk=7)
    assert a.gt_index.tolist() == [1]


def test_exact_tie_between_gts_goes_to_lower_index():
    gts = [[0.0, 0, 40, 40], [0.0, 0, 40, 40]]
    a = run([[20.0, 20]], [64.0], [[0.6, 0.6, 0]], [[0.0, 0, 40, 40]], gts, [1, 0], topk=7)
    assert a.gt_index.tolist() == [0]
    assert a.labels.tolist() == [1]


def test_soft_labels_are_prob_over_max_soft_prob_times_t():
    gt = [[0.0, 0, 100, 100]]
    points = [[20.0, 20], [40.0, 40], [60.0, 60], [80.0, 80]]
    prob = [[0, 0.9, 0], [0, 0.2, 0], [0, 0.4, 0], [0, 0.1, 0]]
    pred = [[0.0, 0, 100, 100], [0.0, 0, 100, 80], [0.0, 0, 100, 70], [0.0, 0, 100, 90]]
    t = 0.3
    a = run(points, [128.0] * 4, prob, pred, gt, [1], t=t, topk=7)
    # qualities: 1.0, q(.2,.8), q(.4,.7), q(.1,.9): the certain positive is point 0
    assert a.soft_labels[0] == 1.0 and a.weights[0] == 1.0
    expected = [0.2 / 0.4 * t, 0.4 / 0.4 * t, 0.1 / 0.4 * t]
    assert a.soft_labels[1:].tolist() == pytest.approx(expected)
    assert a.weights[1:].tolist() == pytest.approx([0.4] * 3)
    assert a.labels.tolist() == [1] * 4
    assert a.box_targets[1].tolist() == [40.0, 40.0, 60.0, 60.0]


def test_zero_quality_pick_is_dropped():
    # IoU > 0 but prob 0: quality 0, so not a pick although k allows it.
    a = run([[20.0, 20], [30.0, 30]], [64.0] * 2, [[1.0, 0, 0], [0.0, 0, 0]],
            [[0.0, 0, 40, 40], [0.0, 0, 40, 40]], [[0.0, 0, 40, 40]], [0])
    assert a.gt_index.tolist() == [0, -1]


def test_zero_gt_image_is_all_background():
    a = one_to_few(torch.rand(10, 2) * 100, torch.full((10,), 8.0), torch.rand(10, C),
                   torch.rand(10, 4) * 100, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                   num_classes=C, t=0.5)
    assert (a.labels == C).all() and (a.gt_index == -1).all()
    assert a.box_targets.abs().sum() == 0 and a.soft_labels.sum() == 0 and a.weights.sum() == 0


def test_schedule_runs_from_0_6_to_0_2():
    assert soft_label_ceiling(0, 12) == pytest.approx(0.6)
    assert soft_label_ceiling(11, 12) == pytest.approx(0.2)
    assert soft_label_ceiling(5.5, 12) == pytest.approx(0.4)
    assert soft_label_ceiling(6, 13) == pytest.approx(0.4)
    assert soft_label_ceiling(99, 12) == pytest.approx(0.2)  # clamped
    assert soft_label_ceiling(0, 1) == pytest.approx(0.2)


def random_case(seed, num_points=400, num_gts=12, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    strides = torch.tensor([8.0, 16, 32])[torch.randint(0, 3, (num_points,), generator=g)]
    points = torch.rand(num_points, 2, generator=g) * 200
    xy = torch.rand(num_gts, 2, generator=g) * 150
    gt = torch.cat([xy, xy + 10 + torch.rand(num_gts, 2, generator=g) * 60], 1)
    labels = torch.randint(0, num_classes, (num_gts,), generator=g)
    ltrb = torch.rand(num_points, 4, generator=g) * 40
    pred = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1)
    prob = torch.rand(num_points, num_classes, generator=g)
    return points, strides, prob, pred, gt, labels


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("topk", [1, 4, 7])
def test_vectorised_equals_per_gt_loop(seed, topk):
    points, strides, prob, pred, gt, labels = random_case(seed)
    a = one_to_few(points, strides, prob, pred, gt, labels, num_classes=4, t=0.37, topk=topk)
    ref = one_to_few_loop(points, strides, prob, pred, gt, labels, num_classes=4, t=0.37,
                          topk=topk)
    assert a.gt_index.tolist() == ref[4].tolist()
    assert torch.equal(a.labels, ref[0])
    torch.testing.assert_close(a.box_targets, ref[1])
    torch.testing.assert_close(a.soft_labels, ref[2])
    torch.testing.assert_close(a.weights, ref[3])
    # every gt has at most one certain positive and at most topk points
    pos = a.gt_index[a.gt_index >= 0]
    assert torch.bincount(pos, minlength=len(gt)).max() <= topk
    certain = a.gt_index[(a.soft_labels == 1.0) & (a.weights == 1.0)]
    assert torch.bincount(certain, minlength=len(gt)).max() <= 1


def test_fcos_one_to_many_uses_size_ranges_and_smallest_area():
    strides = torch.tensor([8.0, 16.0, 32.0])
    assert level_ranges(strides).tolist() == [[-1, 64], [64, 128], [128, math.inf]]
    gts = torch.tensor([[0.0, 0, 100, 100], [30.0, 30, 70, 70]])
    points = torch.tensor([[50.0, 50], [50.0, 50], [44.0, 50]])
    a = one_to_many(points, torch.tensor([8.0, 16.0, 16.0]), gts, torch.tensor([0, 2]),
                    num_classes=C)
    # point 0 (stride 8): reach 50 to gt0 and 20 to gt1, both in (-1, 64]: smaller gt1 wins.
    # point 1 (stride 16): range (64, 128] excludes both.
    assert a.gt_index.tolist() == [1, -1, -1]
    assert a.labels.tolist() == [2, C, C]


@pytest.mark.parametrize("seed", range(4))
def test_window_candidate_search_equals_the_dense_mask(seed):
    from o2f.assign import candidate_pairs
    from o2f.model.head import make_points

    g = torch.Generator().manual_seed(seed)
    shapes = [(25, 40), (13, 20), (7, 10), (4, 5), (2, 3)]
    points, strides = make_points(shapes, [8, 16, 32, 64, 128], torch.device("cpu"))
    xy = torch.rand(30, 2, generator=g) * torch.tensor([300.0, 180])
    gt = torch.cat([xy, xy + 2 + torch.rand(30, 2, generator=g) * 200], 1)
    gt[0] = torch.tensor([-20.0, -20, 30, 30])  # reaches outside the map
    gt[1] = torch.tensor([8.0, 8, 24, 24])  # box edges on cell centres
    dense = candidate_pairs(points, strides, gt, 1.5)
    window = candidate_pairs(points, strides, gt, 1.5, level_shapes=shapes)
    assert torch.equal(dense[0], window[0]) and torch.equal(dense[1], window[1])
    ltrb = torch.rand(len(points), 4, generator=g) * 60
    pred = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1)
    prob = torch.rand(len(points), 5, generator=g)
    labels = torch.randint(0, 5, (30,), generator=g)
    a = one_to_few(points, strides, prob, pred, gt, labels, num_classes=5, t=0.3)
    b = one_to_few(points, strides, prob, pred, gt, labels, num_classes=5, t=0.3,
                   level_shapes=shapes)
    assert torch.equal(a.gt_index, b.gt_index)
    torch.testing.assert_close(a.soft_labels, b.soft_labels)
