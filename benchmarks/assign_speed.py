"""Speed of the vectorised one-to-few assignment against a straightforward per-gt loop.

The loop version is written the way the reference release does it: the candidate region,
IoU and quality as whole tensors, then a Python loop over ground-truth boxes for the
top-k picks and another for the soft labels. Both run on one 800 x 1333 image (P3-P7,
80 classes) at 10 / 50 / 200 ground-truth boxes, and must give the same positives.

    python benchmarks/assign_speed.py [--repeats 5] [--device cpu] [--step]

With ``--step`` it also times one R-50 training step (800 x 1333, batch 2, 50 boxes per
image) and reports the share of it spent in the assignment.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.ops import box_iou

from o2f.assign import box_distances, candidate_mask, one_to_few
from o2f.model.head import make_points


def one_to_few_per_gt_loop(points, strides, cls_prob, pred_boxes, gt_boxes, gt_labels, *,
                           num_classes, t, topk=7, alpha=0.8, radius=1.5, soft_weight=0.4):
    n, g = points.shape[0], gt_boxes.shape[0]
    prob = cls_prob[:, gt_labels]
    candidate = candidate_mask(points, strides, gt_boxes, radius)
    iou = torch.where(candidate, box_iou(pred_boxes, gt_boxes), 0.0)
    quality = torch.where(candidate, prob ** (1 - alpha) * iou ** alpha, 0.0)
    picks = torch.zeros_like(quality)
    counts = (iou > 0).sum(0)
    for j in range(g):
        k = min(int(counts[j]), topk)
        val, idx = quality[:, j].topk(k)
        picks[idx, j] = val
    best, gt_index = picks.max(1)
    gt_index = torch.where(best > 0, gt_index, -1)
    labels = torch.full((n,), num_classes, dtype=torch.int64)
    soft_labels, weights = torch.zeros(n), torch.zeros(n)
    box_targets = torch.zeros(n, 4)
    for j in range(g):
        mine = torch.nonzero(gt_index == j).squeeze(1)
        if mine.numel() == 0:
            continue
        order = quality[mine, j].argsort(descending=True)
        mine = mine[order]
        p = prob[mine, j]
        s = torch.full_like(p, 1.0)
        w = torch.full_like(p, soft_weight)
        if mine.numel() > 1:
            s[1:] = p[1:] / p[1:].max() * t
        w[0] = 1.0
        labels[mine], soft_labels[mine], weights[mine] = gt_labels[j], s, w
        box_targets[mine] = box_distances(points[mine], gt_boxes[j : j + 1])[:, 0]
    return labels, box_targets, soft_labels, weights, gt_index


def make_case(num_gts: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w, strides_ = 800, 1333, [8, 16, 32, 64, 128]
    shapes = [((h + s - 1) // s, (w + s - 1) // s) for s in strides_]
    points, strides = make_points(shapes, strides_, torch.device("cpu"))
    n = points.shape[0]
    xy = torch.rand(num_gts, 2, generator=g) * torch.tensor([w - 200.0, h - 200.0])
    gt = torch.cat([xy, xy + 16 + torch.rand(num_gts, 2, generator=g) * 300], 1)
    labels = torch.randint(0, 80, (num_gts,), generator=g)
    ltrb = torch.rand(n, 4, generator=g) * strides[:, None] * 4
    pred = torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1)
    prob = torch.rand(n, 80, generator=g) * 0.3
    return [x.to(device) for x in (points, strides, prob, pred, gt, labels)], shapes


def timeit(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step", action="store_true",
                        help="also time the assignment inside an R-50 training step")
    args = parser.parse_args()
    kw = dict(num_classes=80, t=0.4)
    print(f"{'gts':>5} {'vectorised ms':>14} {'per-gt loop ms':>15} {'speed-up':>9}")
    for num_gts in (10, 50, 200):
        case, shapes = make_case(num_gts, args.device)
        fast = one_to_few(*case, **kw, level_shapes=shapes)
        slow = one_to_few_per_gt_loop(*case, **kw)
        assert torch.equal(fast.gt_index.cpu(), slow[4].cpu()), "assignments differ"
        torch.testing.assert_close(fast.soft_labels.cpu(), slow[2].cpu())
        t_fast = timeit(lambda c=case, s=shapes: one_to_few(*c, **kw, level_shapes=s),
                        args.repeats)
        t_slow = timeit(lambda c=case: one_to_few_per_gt_loop(*c, **kw), args.repeats)
        print(f"{num_gts:>5} {t_fast * 1e3:>14.1f} {t_slow * 1e3:>15.1f} "
              f"{t_slow / t_fast:>8.1f}x")
    if args.step:
        step_share(args.device)


def step_share(device: str, repeats: int = 2) -> None:
    """Seconds of one R-50 training step, and of the assignment inside it."""
    import o2f

    model = o2f.build_model("r50_1x", backbone_weights=None, min_size=800,
                            max_size=1333).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1333, generator=g).to(device) for _ in range(2)]
    targets = []
    for _ in images:
        xy = torch.rand(50, 2, generator=g) * torch.tensor([1100.0, 600.0])
        boxes = torch.cat([xy, xy + 16 + torch.rand(50, 2, generator=g) * 200], 1)
        targets.append({"boxes": boxes.to(device),
                        "labels": torch.randint(0, 80, (50,), generator=g).to(device)})
    spent = []
    original = model.assign

    def timed_assign(*a, **kw):
        start = time.perf_counter()
        result = original(*a, **kw)
        spent.append(time.perf_counter() - start)
        return result

    model.assign = timed_assign

    def step():
        losses = model(images, targets, t=0.4)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    t_step = timeit(step, repeats)
    t_assign = statistics.median(spent[1:])
    print(f"R-50 training step 800x1333, batch 2, 50 gts/image: {t_step:.2f} s; "
          f"assignment {t_assign * 1e3:.1f} ms = {100 * t_assign / t_step:.2f}% of the step")


if __name__ == "__main__":
    main()
