"""POTO (DeFCN) and YOLOv10's dual assignment: the rules against brute force, the dual
head's export, and training on a fixed batch."""

import itertools

import pytest
import torch
from test_model import synthetic_image, tiny_config
from torchvision.ops import box_iou

import o2f
from o2f.assign import ASSIGNMENTS, candidate_mask, poto, poto_auxiliary, task_aligned
from o2f.model.head import make_points

C = 3


def random_case(seed: int, num_gts: int, spread: float = 40.0):
    """Points of a 48 x 48 image (strides 8 and 16), gts near each other (their priors
    overlap), random scores and predicted boxes."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 6), (3, 3)]
    points, strides = make_points(shapes, [8, 16], torch.device("cpu"))
    n = points.shape[0]
    xy = 4 + torch.rand(num_gts, 2, generator=g) * spread * 0.6
    gt = torch.cat([xy, xy + 8 + torch.rand(num_gts, 2, generator=g) * 16], 1)
    labels = torch.randint(0, C, (num_gts,), generator=g)
    ltrb = torch.rand(n, 4, generator=g) * strides[:, None] * 1.5
    pred = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1)
    scores = torch.rand(n, C, generator=g)
    return points, strides, shapes, scores, pred, gt, labels


def best_matching(quality: torch.Tensor, allowed: torch.Tensor) -> float:
    """Largest total quality over matchings (one point per gt, one gt per point, a gt may
    stay unmatched) using allowed pairs only, by enumeration. quality, allowed (N, G)."""
    options = [[None, *torch.nonzero(allowed[:, j]).squeeze(1).tolist()]
               for j in range(quality.shape[1])]
    best = 0.0
    for choice in itertools.product(*options):
        used = [p for p in choice if p is not None]
        if len(used) != len(set(used)):
            continue
        best = max(best, sum(float(quality[p, j]) for j, p in enumerate(choice)
                             if p is not None))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_poto_matching_is_the_brute_force_optimum_inside_the_prior(seed):
    points, strides, shapes, scores, pred, gt, labels = random_case(seed, num_gts=2 + seed % 3)
    radius = 1.0
    a = poto(points, strides, scores, pred, gt, labels, num_classes=C, radius=radius,
             level_shapes=shapes)
    prior = candidate_mask(points, strides, gt, radius)  # (N, G)
    quality = scores[:, labels] ** 0.2 * box_iou(pred, gt) ** 0.8
    pos = torch.nonzero(a.positive).squeeze(1)
    matched_gts = a.gt_index[pos]
    assert matched_gts.unique().numel() == matched_gts.numel()  # one point per gt
    assert prior[pos, matched_gts].all()  # only inside the prior
    total = quality[pos, matched_gts].sum().item()
    assert total == pytest.approx(best_matching(quality, prior), abs=1e-5)
    # every gt with a candidate gets its point here (the random cases leave none out)
    assert matched_gts.numel() == (prior.any(0)).sum()
    assert a.labels[pos].tolist() == labels[matched_gts].tolist()
    assert a.soft_labels[pos].eq(1).all() and a.box_weights[pos].eq(1).all()
    assert a.loss == "focal"


def test_poto_gives_the_contested_point_to_the_gt_that_loses_least():
    # Point 0 is the best of both gts; gt 1 has no other candidate of any quality, so the
    # optimum gives point 0 to gt 1 and gt 0 its second choice (greedy by gt would not).
    points = torch.tensor([[20.0, 20], [28.0, 20]])
    strides = torch.tensor([64.0, 64])
    gt = torch.tensor([[0.0, 0, 40, 40], [10.0, 10, 26, 30]])  # point 1 outside gt 1's box
    pred = torch.tensor([[0.0, 0, 40, 40], [2.0, 0, 40, 40]])
    scores = torch.tensor([[0.9, 0.9, 0], [0.8, 0, 0]])
    a = poto(points, strides, scores, pred, gt, torch.tensor([0, 1]), num_classes=C)
    assert a.gt_index.tolist() == [1, 0]


def test_poto_auxiliary_positives_lie_in_their_gt_and_above_the_quality_threshold():
    points, strides, shapes, scores, pred, gt, labels = random_case(3, num_gts=3)
    a = poto_auxiliary(points, scores, pred, gt, labels, shapes, num_classes=C, topk=4)
    pos = torch.nonzero(a.positive).squeeze(1)
    assert pos.numel() > 3  # one-to-many
    box = gt[a.gt_index[pos]]
    p = points[pos]
    assert ((p > box[:, :2]) & (p < box[:, 2:])).all()
    assert a.loss == "focal_cls" and not a.regress


def task_metric(points, scores, pred, gt, labels):
    """(N, G) p^0.5 * IoU^6, zero for points outside the gt box."""
    inside = ((points[:, None] > gt[None, :, :2]) & (points[:, None] < gt[None, :, 2:])).all(-1)
    return torch.where(inside, scores[:, labels] ** 0.5 * box_iou(pred, gt) ** 6, 0.0)


@pytest.mark.parametrize("seed", range(10))
def test_dual_one_to_one_target_is_the_top_1_of_the_same_metric_as_its_top_10(seed):
    points, strides, shapes, scores, pred, gt, labels = random_case(seed, num_gts=2)
    # disjoint boxes (no point is wanted by both), each holding several points
    gt = torch.tensor([[2.0, 2, 22, 24], [25.0, 24, 46, 44]])
    kw = dict(num_classes=C)
    o2o = task_aligned(points, scores, pred, gt, labels, topk=1, **kw)
    o2m = task_aligned(points, scores, pred, gt, labels, topk=10, **kw)
    metric = task_metric(points, scores, pred, gt, labels)
    iou = box_iou(pred, gt)
    for j in range(2):
        order = metric[:, j].argsort(descending=True)
        top10 = [i for i in order[:10].tolist() if metric[i, j] > 0]
        mine_o2o = torch.nonzero(o2o.gt_index == j).squeeze(1).tolist()
        mine_o2m = torch.nonzero(o2m.gt_index == j).squeeze(1).tolist()
        assert mine_o2o == top10[:1]
        assert sorted(mine_o2m) == sorted(top10)
        # targets: the metric normalised to the gt's best IoU among its positives
        torch.testing.assert_close(o2o.soft_labels[mine_o2o], iou[mine_o2o, j])
        m, best_iou = metric[top10, j], iou[top10, j].max()
        torch.testing.assert_close(o2m.soft_labels[top10], m * best_iou / m.max())
        torch.testing.assert_close(o2m.box_weights[top10], o2m.soft_labels[top10])


def test_every_rule_shares_one_signature_and_result():
    model = o2f.O2F(tiny_config(assign="dual")).train()
    image, target = synthetic_image()
    out = model.forward_dense(model.preprocess([image])[0])
    for name in ASSIGNMENTS:
        model.cfg.assign = name
        (a,) = model.assign(out, [target], t=0.5)
        n = out.points.shape[0]
        assert a.labels.shape == (n,) and a.box_targets.shape == (n, 4)
        assert 0 < a.positive.sum() and a.gt_index.max() == 2, name
    with pytest.raises(ValueError, match="model.assign must be one of"):
        o2f.O2F(tiny_config(assign="ota"))


def test_dual_one_to_one_branch_reads_detached_features():
    model = o2f.O2F(tiny_config(assign="dual")).train()
    image, target = synthetic_image()
    batch = model.preprocess([image])[0]
    out = model.forward_dense(batch)
    assert out.one_to_many is not None
    (a,) = model.assign(out, [target], t=0.5)
    a.aux = None  # the one-to-one losses alone
    sum(model.detection_losses(out, [target], [a]).values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.backbone.parameters())
    assert model.head.cls_out.weight.grad.abs().sum() > 0
    assert model.head.one_to_many.cls_out.weight.grad is None
    model.eval()
    assert model.forward_dense(batch).one_to_many is None


@pytest.mark.parametrize("assign, aux", [("poto", False), ("poto", True), ("dual", False)])
def test_training_on_a_fixed_batch_lowers_the_loss(assign, aux):
    torch.manual_seed(0)
    model = o2f.O2F(tiny_config(assign=assign, poto_aux=aux)).train()
    image, target = synthetic_image()
    keys = {"loss_cls", "loss_box"} | ({"loss_cls_aux"} if aux else set()) | (
        {"loss_cls_aux", "loss_box_aux"} if assign == "dual" else set())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    # dual's BCE is normalised by the sum of its targets, which grows from ~0 as the
    # boxes start to overlap their gts: its loss rises before it falls
    for _ in range(25 if assign == "dual" else 12):
        losses = model([image], [target])
        assert set(losses) == keys
        assert all(torch.isfinite(v) and v >= 0 for v in losses.values()), losses
        total = sum(losses.values())
        history.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert sum(history[-3:]) / 3 < 0.7 * sum(history[:3]) / 3, history


def test_dual_export_holds_the_one_to_one_branch_only(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from o2f.export import OnnxDetector, export_onnx, onnx_ops

    torch.manual_seed(0)
    model = o2f.O2F(tiny_config(assign="dual", min_size=128, max_size=128)).eval()
    torch.nn.init.normal_(model.head.cls_out.weight, std=0.5)
    path = export_onnx(model, tmp_path / "dual.onnx", size=(128, 128))
    assert "NonMaxSuppression" not in onnx_ops(path)
    inits = onnx.load(str(path)).graph.initializer
    names = [i.name for i in inits]
    assert not any("one_to_many" in name for name in names)
    assert any("cls_out" in name for name in names)
    branch = sum(p.numel() for p in model.head.one_to_many.parameters())
    total = sum(p.numel() for p in model.parameters())
    stored = sum(torch.Size(i.dims).numel() for i in inits)
    # the one-to-one model's parameters (give or take folded norms and a few constants),
    # far from the whole model's
    assert abs(stored - (total - branch)) < branch / 10
    image = torch.rand(3, 128, 128)
    onnx_scores = OnnxDetector(path)([image])[0]["scores"]
    with torch.no_grad():
        torch_scores = model([image])[0]["scores"].numpy()
    assert len(onnx_scores) == len(torch_scores) > 0
    assert abs(onnx_scores - torch_scores).max() < 1e-4
