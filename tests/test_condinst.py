"""Instance segmentation (CondInst + one-to-few): the dynamic mask head, Dice loss, mask
targets through the data pipeline, mask pasting, segm evaluation, and the command line."""

import contextlib
import copy
import io
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO as PyCOCO
from pycocotools.cocoeval import COCOeval as PyCOCOeval
from torchvision import tv_tensors

import o2f
from o2f.assign import Assignment
from o2f.cli import main
from o2f.config import load_config
from o2f.data import build_dataset
from o2f.data.coco import CocoDetection
from o2f.data.transforms import SanitizeBoxes, build_transforms, collate
from o2f.evaluation import evaluate_detections
from o2f.evaluation.coco import STAT_NAMES, coco_evaluate
from o2f.losses import dice_loss
from o2f.model.condinst import (
    CondInst,
    DynamicMaskHead,
    dynamic_param_count,
    mask_targets,
    paste_masks,
)

# ------------------------------------------------------------------------------ the model


def test_dynamic_mask_head_has_169_parameters_per_point_and_the_model_its_shapes():
    assert dynamic_param_count(8, 8, 3) == (8 + 2) * 8 + 8 + 8 * 8 + 8 + 8 * 1 + 1 == 169
    assert dynamic_param_count(4, 16, 2) == (4 + 2) * 16 + 16 + 16 * 1 + 1

    model = o2f.build_model("digits_instance", num_classes=3)
    assert isinstance(model, CondInst) and model.cfg.task == "instance"
    controller = model.head.controller
    assert (controller.in_channels, controller.out_channels, controller.kernel_size) == (
        model.cfg.head_channels, 169, (3, 3))
    tower = [m for m in model.mask_branch.tower if isinstance(m, torch.nn.Sequential)]
    assert len(tower) == 4 and all(t[0].out_channels == model.cfg.mask_channels for t in tower)
    assert model.mask_branch.tower[-1].out_channels == 8

    out = model.eval().forward_dense(torch.zeros(2, 3, 128, 96))
    n = 16 * 12 + 8 * 6 + 4 * 3  # P3-P5
    assert out.params.shape == (2, n, 169)
    assert out.mask_feats.shape == (2, 8, 16, 12)  # stride 8
    assert model.mask_logits(out, 1, torch.tensor([0, 7, n - 1])).shape == (3, 32, 24)  # stride 4

    coco = o2f.build_model("condinst_r50_1x", backbone_weights=None)
    assert coco.cfg.reg_weight == 1.0 and coco.cfg.mask_weight == 2.0 and coco.cfg.o2f_topk == 7
    assert coco.mask_branch.tower[0][0].out_channels == 128
    assert len(coco.mask_branch.refine) == 3  # P3, P4, P5 fused at P3, as the release
    assert type(o2f.build_model("digits")) is o2f.O2F


def test_dynamic_head_by_hand_and_against_grouped_convolutions():
    head = DynamicMaskHead(8, 8, 3)
    # Only w1[0, 0] (relative x -> channel 0), w2[0, 0] and w3[0, 0] are 1: the output is
    # relu(relu(rel_x)), rel_x = (px - cell_x) / (8 * stride).
    params = torch.zeros(1, 169)
    params[0, 0] = 1  # w1 is 8 x 10 row-major: (out 0, in 0)
    params[0, 80] = 1  # w2 (out 0, in 0)
    params[0, 144] = 1  # w3 (out 0, in 0)
    feats = torch.randn(8, 2, 4)
    out = head(feats, params, torch.tensor([[20.0, 12.0]]), torch.tensor([8.0]), feat_stride=8)
    # cell centres x = 4, 12, 20, 28: (20 - 4) / 64, (20 - 12) / 64, 0, negative -> 0
    assert out.shape == (1, 2, 4)
    assert out[0, 0].tolist() == pytest.approx([0.25, 0.125, 0.0, 0.0])
    assert torch.equal(out[0, 0], out[0, 1])  # rel_x does not depend on the row

    # The release's formulation: instances as groups of a grouped 1x1 convolution.
    k, h, w = 4, 5, 7
    feats, params = torch.randn(8, h, w), torch.randn(k, 169)
    points, strides = torch.rand(k, 2) * 60, torch.tensor([8.0, 16.0, 32.0, 8.0])
    ours = head(feats, params, points, strides, feat_stride=8)
    ys, xs = (torch.arange(h) + 0.5) * 8, (torch.arange(w) + 0.5) * 8
    scale = 8 * strides[:, None, None]
    rel_x = ((points[:, 0, None, None] - xs[None, None, :]) / scale).expand(k, h, w)
    rel_y = ((points[:, 1, None, None] - ys[None, :, None]) / scale).expand(k, h, w)
    x = torch.cat([rel_x[:, None], rel_y[:, None], feats.expand(k, -1, -1, -1)], 1)
    x = x.reshape(1, k * 10, h, w)
    w1, w2, w3 = (params[:, a:b] for a, b in ((0, 80), (80, 144), (144, 152)))
    b1, b2, b3 = params[:, 152:160], params[:, 160:168], params[:, 168]
    x = F.relu(F.conv2d(x, w1.reshape(k * 8, 10, 1, 1), b1.reshape(-1), groups=k))
    x = F.relu(F.conv2d(x, w2.reshape(k * 8, 8, 1, 1), b2.reshape(-1), groups=k))
    x = F.conv2d(x, w3.reshape(k, 8, 1, 1), b3, groups=k)
    assert torch.allclose(ours, x.reshape(k, h, w), atol=1e-5)


# ------------------------------------------------------------------------------ the loss


def test_dice_loss_on_hand_made_masks():
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    cases = [
        (target, 0.0),  # perfect
        (torch.tensor([[1.0, 1.0], [0.0, 0.0]]), 1 - 2 * 1 / (2 + 1)),  # one extra pixel: 1/3
        (torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 1.0),  # disjoint
        (torch.full((2, 2), 0.5), 1 - 2 * 0.5 / (4 * 0.25 + 1)),  # p = 0.5 everywhere: 1/2
    ]
    probs = torch.stack([p for p, _ in cases])
    loss = dice_loss(probs, target.expand(len(cases), 2, 2))
    assert loss.shape == (4,)
    assert loss.tolist() == pytest.approx([e for _, e in cases], abs=1e-5)
    # soft targets (area fractions at stride 4): p = g = 0.5 gives 1 - 2 * 0.25 / 0.5 = 0
    half = torch.tensor([[0.5]])
    assert dice_loss(half, half).item() == pytest.approx(0, abs=1e-4)
    assert dice_loss(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 1.0  # empty vs empty


def test_mask_loss_reads_each_positive_s_assigned_gt_mask():
    model = o2f.build_model("digits_instance", num_classes=3).train()
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 4:20, 8:24] = 1
    masks[1, 30:60, 30:50] = 1
    target = {"boxes": torch.tensor([[8.0, 4, 24, 20], [30, 30, 50, 60]]),
              "labels": torch.tensor([0, 2]), "masks": masks}
    out = model.forward_dense(torch.zeros(1, 3, 64, 64))
    n = out.points.shape[0]
    gt_index = torch.full((n,), -1)
    gt_index[[5, 40]] = torch.tensor([1, 0])  # point 5 -> gt 1, point 40 -> gt 0
    labels = torch.full((n,), 3)
    labels[[5, 40]] = torch.tensor([2, 0])
    a = Assignment(labels, torch.zeros(n, 4), (labels < 3).float(), (labels < 3).float(),
                   gt_index)
    loss = model.mask_loss(out, [target], [a])
    expected_targets = mask_targets(masks, (64, 64))[[1, 0]]  # (2, 16, 16) at stride 4
    assert expected_targets[0].sum() == pytest.approx(30 * 20 / 16)
    probs = torch.sigmoid(model.mask_logits(out, 0, torch.tensor([5, 40])))
    assert loss.item() == pytest.approx(2.0 * dice_loss(probs, expected_targets).mean().item())
    no_pos = Assignment(torch.full((n,), 3), torch.zeros(n, 4), torch.zeros(n), torch.zeros(n),
                        torch.full((n,), -1))
    zero = model.mask_loss(out, [target], [no_pos])
    assert zero.item() == 0 and zero.requires_grad


def test_training_and_inference_through_the_list_api():
    model = o2f.build_model("digits_instance", num_classes=3, min_size=64, max_size=200)
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 80)]
    masks = torch.zeros(2, 96, 128)
    masks[0, 10:40, 10:30], masks[1, 50:90, 60:120] = 1, 1
    targets = [{"boxes": torch.tensor([[10.0, 10, 30, 40], [60, 50, 120, 90]]),
                "labels": torch.tensor([0, 1]), "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 80, 80)}]
    losses = model.train()(images, targets, t=0.6)
    assert set(losses) == {"loss_cls", "loss_box", "loss_mask"}
    assert 0 <= losses["loss_mask"].item() <= 2.0 and losses["loss_mask"].requires_grad
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="masks"):
        model(images, [{k: v for k, v in targets[0].items() if k != "masks"}, targets[1]])

    model.eval().cfg.score_thresh = 0.0  # keep every top-k entry of the untrained model
    with torch.inference_mode():
        detections = model(images)
    for det, image in zip(detections, images, strict=True):
        assert det["masks"].dtype == torch.bool
        assert det["masks"].shape == (len(det["boxes"]), *image.shape[-2:])  # input pixels
        assert len(det["boxes"]) == model.cfg.topk


def test_mask_targets_and_pasting_on_hand_made_grids():
    m = torch.zeros(1, 6, 8)
    m[0, 0:4, 0:2] = 1  # 8 of cell (0, 0)'s 16 pixels
    t = mask_targets(m, (8, 12))  # padded to the 8 x 12 batch, stride 4
    assert t.tolist() == [[[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    assert mask_targets(F.pad(m, (0, 4, 0, 2)), (8, 12)).tolist() == t.tolist()  # already padded

    # Output pixel centres are read bilinearly from the stride-4 cells (centres 2, 6, 10):
    # pixel x reads 1 - |x + 0.5 - 6| / 4 of cell column 1, so columns 4-7 read >= 0.625.
    probs = torch.zeros(2, 2, 3)
    probs[0, :, 1] = 1.0  # cell column 1: pixels 4-7
    probs[1, 0, 1] = 1.0  # one cell: bilinear in both directions rounds its corners
    same = paste_masks(probs, (8, 12), (8, 12))
    expected = torch.zeros(2, 8, 12, dtype=torch.bool)
    expected[0, :, 4:8] = True
    expected[1, 0:3, 4:8] = True  # rows 0-2 read >= 0.875 of row 0 (the border clamps)
    expected[1, 3, 5:7] = True  # row 3 reads 0.625: x 0.875 in, x 0.625 = 0.39 out
    assert torch.equal(same, expected)
    # the model resized a 4 x 6 input x2: output pixel X reads batch x = 2 (X + 0.5), so
    # X = 2, 3 (x = 5, 7) read 0.75 of the column, X = 1, 4 (x = 3, 9) only 0.25
    half = paste_masks(probs[:1], (8, 12), (4, 6))
    expected = torch.zeros(1, 4, 6, dtype=torch.bool)
    expected[0, :, 2:4] = True
    assert torch.equal(half, expected)
    assert paste_masks(probs[:0], (8, 12), (4, 6)).shape == (0, 4, 6)


# ------------------------------------------------------------------------------ the data


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's list-of-counts RLE (column-major runs, starting with zeros)."""
    counts, value, run = [], 0, 0
    for v in mask.flatten(order="F").tolist():
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    return {"size": list(mask.shape), "counts": counts + [run]}


@pytest.fixture
def masked_coco(tmp_path):
    """One 60 x 80 image with a polygon, a compressed RLE, an uncompressed RLE and a box
    without segmentation; a second image with one polygon."""
    h, w = 60, 80
    block = np.zeros((h, w), np.uint8)
    block[35:55, 50:75] = 1
    ring = np.zeros((h, w), np.uint8)
    ring[5:25, 45:60] = 1
    ring[10:20, 50:55] = 0
    anns = [
        {"bbox": [10, 10, 30, 20], "segmentation": [[10, 10, 40, 10, 40, 30, 10, 30]]},
        {"bbox": [50, 35, 25, 20], "segmentation": _rle(block)},
        {"bbox": [45, 5, 15, 20], "segmentation": _uncompressed_rle(ring)},
        {"bbox": [2, 40, 20, 15]},
    ]
    records = [dict(a, id=i + 1, image_id=1, category_id=1 + i % 2, iscrowd=0,
                    area=a["bbox"][2] * a["bbox"][3]) for i, a in enumerate(anns)]
    records.append({"id": 5, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 100,
                    "bbox": [4, 4, 10, 10], "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]})
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (h, w)), ("b.png", (40, 50))):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / name)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h},
                   {"id": 2, "file_name": "b.png", "width": 50, "height": 40}],
        "annotations": records,
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}))
    return path, tmp_path, {"block": block, "ring": ring}


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_masks_decode_and_follow_their_boxes_through_resize_and_flip(masked_coco):
    path, img_dir, raw = masked_coco
    plain = CocoDetection(path, img_dir, train=True, with_masks=True)
    _, target = plain[0]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
    assert masks.shape == (4, 60, 80)
    assert torch.equal(masks[1], torch.from_numpy(raw["block"]))  # compressed RLE
    assert torch.equal(masks[2], torch.from_numpy(raw["ring"]))  # uncompressed RLE
    assert masks[3].sum() == 20 * 15 and _tight_box(masks[3]) == [2, 40, 22, 55]  # box fill
    assert "masks" not in CocoDetection(path, img_dir, train=True)[0][1]

    tf = build_transforms(True, min_size=120, max_size=1000, flip=True)  # x2, random flip
    ds = CocoDetection(path, img_dir, tf, train=True, with_masks=True)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = ds[0]
        assert image.shape == (3, 120, 160) and target["masks"].shape == (4, 120, 160)
        flips.add(target["boxes"][0, 0].item() == 160 - 2 * 40)
        for mask, box in zip(target["masks"], target["boxes"], strict=True):
            assert _tight_box(mask) == pytest.approx(box.tolist(), abs=2)
    assert flips == {True, False}


def test_sanitize_drops_masks_with_their_boxes_and_collate_pads_them():
    m = torch.zeros(3, 10, 12, dtype=torch.uint8)
    for i in range(3):
        m[i, i, i] = i + 1
    target = {"boxes": tv_tensors.BoundingBoxes([[1.0, 1, 5, 5], [2, 2, 2, 7], [3, 3, 9, 9]],
                                                format="XYXY", canvas_size=(10, 12)),
              "labels": torch.tensor([7, 8, 9]), "masks": tv_tensors.Mask(m)}
    _, out = SanitizeBoxes()(torch.zeros(3, 10, 12), target)
    assert out["labels"].tolist() == [7, 9]
    assert torch.equal(out["masks"], m[[0, 2]])

    def sample(h, w, g):
        masks = tv_tensors.Mask(torch.ones(g, h, w, dtype=torch.uint8))
        return torch.rand(3, h, w), {"boxes": torch.zeros(g, 4), "labels": torch.zeros(g),
                                     "masks": masks}

    a, b = sample(40, 50, 1), sample(33, 70, 0)
    images, _, targets = collate([a, b])
    assert images.shape == (2, 3, 64, 96)
    assert type(targets[0]["masks"]) is torch.Tensor
    assert targets[0]["masks"].shape == (1, 64, 96) and targets[1]["masks"].shape == (0, 64, 96)
    assert targets[0]["masks"].sum() == 40 * 50 and targets[0]["masks"][0, :40, :50].all()


def test_build_dataset_loads_masks_for_the_instance_task_only(masked_coco):
    path, img_dir, _ = masked_coco
    sets = [f"data.{s}.{k}={v}" for s in ("train", "val")
            for k, v in (("ann_file", path), ("img_dir", img_dir))]
    cfg = load_config("digits_instance", sets)
    assert build_dataset(cfg, "train").with_masks
    assert not build_dataset(cfg, "val").with_masks  # evaluation reads the JSON itself
    assert not build_dataset(load_config("digits", sets), "train").with_masks


# ------------------------------------------------------------------------------ evaluation


def _segm_case(seed: int = 0, n_images: int = 12):
    """Ground-truth masks (blobs and rings of every COCO size range, some crowd) and
    detections: shifted / eroded copies plus false positives, each with its box."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    cats = [{"id": 4, "name": "a"}, {"id": 9, "name": "b"}]
    for img_id in range(1, n_images + 1):
        h, w = int(rng.integers(200, 320)), int(rng.integers(200, 320))
        images.append({"id": img_id, "file_name": f"{img_id}.png", "width": w, "height": h})
        for _ in range(int(rng.integers(1, 6))):
            side = int(rng.choice([rng.integers(4, 30), rng.integers(36, 90),
                                   rng.integers(100, 180)]))
            mh, mw = min(side, h - 2), min(int(side * rng.uniform(0.6, 1.4)), w - 2)
            y, x = int(rng.integers(0, h - mh)), int(rng.integers(0, w - mw))
            m = np.zeros((h, w), np.uint8)
            m[y:y + mh, x:x + mw] = 1
            if mh > 8 and mw > 8 and rng.random() < 0.5:  # a hole: mask area < box area
                m[y + mh // 4:y + 3 * mh // 4, x + mw // 4:x + 3 * mw // 4] = 0
            cat = int(rng.choice([4, 9]))
            rle = _rle(m)
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": cat,
                         "segmentation": rle, "area": float(m.sum()),
                         "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                         "iscrowd": int(rng.random() < 0.1)})
            for _ in range(int(rng.integers(0, 3))):
                d = np.roll(m, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
                if rng.random() < 0.5:
                    d[y:y + max(1, mh // 5)] = 0
                if d.sum() == 0:
                    continue
                r = _rle(d)
                dets.append({"image_id": img_id, "category_id": cat, "segmentation": r,
                             "bbox": [float(v) for v in mask_utils.toBbox(r)],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 4))):
            d = np.zeros((h, w), np.uint8)
            y, x = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
            d[y:y + int(rng.integers(3, 40)), x:x + int(rng.integers(3, 40))] = 1
            r = _rle(d)
            dets.append({"image_id": img_id, "category_id": int(rng.choice([4, 9])),
                         "segmentation": r, "bbox": [float(v) for v in mask_utils.toBbox(r)],
                         "score": float(rng.random() * 0.6)})
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _pycocotools(gt: dict, dets: list, iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = PyCOCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = PyCOCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_segm_evaluation_equals_pycocotools():
    gt, dets = _segm_case()
    masks_only = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    boxes_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    ref_segm = _pycocotools(gt, masks_only, "segm")
    ref_bbox = _pycocotools(gt, boxes_only, "bbox")

    ours = coco_evaluate(gt, masks_only, iou_type="segm")
    for name, expected in zip(STAT_NAMES, ref_segm, strict=True):
        assert math.isclose(ours[name], expected, rel_tol=0, abs_tol=1e-9), name
    assert all(0.05 < ours[k] < 0.95 for k in ("AP", "APs", "APm", "APl"))  # not degenerate
    assert not np.allclose(ref_segm, ref_bbox)  # masks with holes: not the box numbers

    with contextlib.redirect_stdout(io.StringIO()):
        index = PyCOCO()
        index.dataset = copy.deepcopy(gt)
        index.createIndex()
    metrics = evaluate_detections(SimpleNamespace(coco=index, format="coco"), dets)
    assert list(metrics) == list(STAT_NAMES) + [f"segm_{k}" for k in STAT_NAMES]
    for name, box, segm in zip(STAT_NAMES, ref_bbox, ref_segm, strict=True):
        assert math.isclose(metrics[name], box, rel_tol=0, abs_tol=1e-9), name
        assert math.isclose(metrics[f"segm_{name}"], segm, rel_tol=0, abs_tol=1e-9), name
    empty = evaluate_detections(SimpleNamespace(coco=index, format="coco"), [], segm=True)
    assert empty == dict.fromkeys(metrics, 0.0)


# ------------------------------------------------------------------------------ end to end


def test_train_eval_predict_digits_instance_through_the_cli(tmp_path):
    from o2f.data.digits import make_digits

    data = tmp_path / "digits"
    make_digits(data, num_train=8, num_val=4, progress=False)
    sets = {"data.train.ann_file": data / "annotations/train.json",
            "data.train.img_dir": data / "train",
            "data.val.ann_file": data / "annotations/val.json", "data.val.img_dir": data / "val",
            "data.num_workers": 0, "train.epochs": 1, "train.batch_size": 4,
            "train.warmup_iters": 1, "train.eval_every": 1,
            "model.score_thresh": 0.0}  # the untrained model's detections still count
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    work = tmp_path / "run"
    assert main(["train", "--config", "digits_instance", "--work-dir", str(work), *args]) == 0
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"AP", "AR100", "segm_AP", "segm_AP50", "segm_ARl"} <= set(record)

    metrics_out, results_out = tmp_path / "m.json", tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(work / "last.pt"), "--metrics-out",
                 str(metrics_out), "--results-out", str(results_out)]) == 0
    metrics = json.loads(metrics_out.read_text())
    assert metrics == pytest.approx({k: record[k] for k in metrics}, abs=1e-9)
    assert list(metrics) == list(STAT_NAMES) + [f"segm_{k}" for k in STAT_NAMES]
    results = json.loads(results_out.read_text())
    sizes = {img["id"]: [img["height"], img["width"]]
             for img in json.loads(sets["data.val.ann_file"].read_text())["images"]}
    assert results and all(r["segmentation"]["size"] == sizes[r["image_id"]] for r in results)
    assert isinstance(results[0]["segmentation"]["counts"], str)

    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(work / "last.pt"), str(data / "val"),
                 "--out", str(out), "--score-thresh", "0"]) == 0
    records = json.loads((out / "detections.json").read_text())
    assert len(records) == 4 and len(list(out.glob("*.png"))) == 4
    first = records[0]["detections"][0]
    assert mask_utils.decode(first["segmentation"]).shape == tuple(
        first["segmentation"]["size"])
