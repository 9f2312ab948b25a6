"""The detector: construction, pre/post-processing, losses, and learning."""

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

import o2f
from o2f.config import ModelConfig
from o2f.model.detector import HeadOutputs
from o2f.model.head import make_points


def tiny_config(**kw) -> ModelConfig:
    base = dict(backbone="digits_cnn", num_classes=3, fpn_channels=32, head_channels=32,
                head_convs=1, obj_channels=32, obj_convs=1, num_levels=3, min_size=0,
                max_size=0)
    return ModelConfig(**{**base, **kw})


def test_r50_preset_matches_the_spec_architecture():
    model = o2f.build_model("r50_1x", num_classes=80, backbone_weights=None)
    assert model.strides == [8, 16, 32, 64, 128]
    extra = model.neck.fpn.extra_blocks
    assert isinstance(extra, torchvision.ops.feature_pyramid_network.LastLevelP6P7)
    assert extra.use_P5  # P6 from the P5 output, not from C5
    head = model.head
    assert len(head.cls_tower) == 12 and head.cls_tower[1].num_groups == 32
    assert head.obj_tower[0].out_channels == 64 and head.obj_tower[1].num_groups == 32
    assert all(m.bias is not None for m in head.modules() if isinstance(m, torch.nn.Conv2d))
    assert head.cls_out.bias[0].item() == pytest.approx(-torch.log(torch.tensor(99.0)).item())
    assert [s.scale.item() for s in head.scales] == [1.0] * 5
    images = torch.zeros(1, 3, 128, 160)
    out = model.eval().forward_dense(images)
    assert out.cls_logits.shape == (1, 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3 + 1 * 2, 80)


def test_imagenet_mode_freezes_stem_and_stage1_and_keeps_bn_statistics(tmp_path):
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    model = o2f.build_model("r50_1x", backbone="resnet18", backbone_weights=str(weights),
                            num_classes=2)
    bb = model.backbone
    assert not any(p.requires_grad for p in bb.stem.parameters())
    assert not any(p.requires_grad for p in bb.layer1.parameters())
    assert bb.layer2[0].bn1.weight.requires_grad  # affine still trains
    model.train()
    assert not bb.layer2[0].bn1.training  # statistics frozen
    scratch = o2f.build_model("digits", num_classes=2).train()
    assert scratch.backbone.stages[0][0][1].training


def test_inference_is_top_k_sorted_and_maps_boxes_back_to_the_input(monkeypatch):
    model = o2f.O2F(tiny_config(min_size=200, max_size=1000, topk=5)).eval()
    image = torch.rand(3, 100, 150)  # resized x2 to 200 x 300

    def fake_dense(batch):
        assert batch.shape[-2:] == (224, 320)  # padded to multiples of 32
        shapes = [(28, 40), (14, 20), (7, 10)]
        points, strides = make_points(shapes, [8, 16, 32], batch.device)
        n = points.shape[0]
        cls = torch.full((1, n, 3), -10.0)
        cls[0, :20, 1] = torch.linspace(5, 1, 20)  # 20 confident points of class 1
        ltrb = torch.full((1, n, 4), 8.0)
        ltrb[0, 0] = torch.tensor([4.0, 4, 40, 60])  # point 0 at (4, 4): box (0, 0, 44, 64)
        return HeadOutputs(cls, ltrb, torch.full((1, n), 10.0), points, strides, shapes)

    monkeypatch.setattr(model, "forward_dense", fake_dense)
    (det,) = model([image])
    assert len(det["boxes"]) == 5
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert det["labels"].tolist() == [1] * 5
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.0, 0, 22, 32]))
    assert det["boxes"][:, 2].max() <= 150 and det["boxes"][:, 3].max() <= 100


def test_train_mode_returns_losses_and_handles_an_image_without_boxes():
    model = o2f.O2F(tiny_config()).train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 60, 50]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets, t=0.6)
    assert set(losses) == {"loss_cls", "loss_box"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    empty = model(images[1:], targets[1:])
    assert empty["loss_box"].item() == 0.0
    sum(empty.values()).backward()


def positives_per_gt(assign: str) -> float:
    model = o2f.O2F(tiny_config(assign=assign))
    torch.nn.init.constant_(model.head.reg_out.bias, 2.0)  # predicted boxes of 4 strides
    boxes = torch.tensor([[20.0, 20, 120, 110], [150.0, 40, 230, 150], [30.0, 140, 90, 230]])
    out = model.forward_dense(model.preprocess([torch.rand(3, 256, 256)])[0])
    (a,) = model.assign(out, [{"boxes": boxes, "labels": torch.tensor([0, 1, 2])}], t=0.6)
    return a.positive.sum().item() / len(boxes)


def test_o2m_has_more_positives_than_o2f_and_o2f_more_than_o2o():
    o2m, o2f_, o2o = (positives_per_gt(m) for m in ("o2m", "o2f", "o2o"))
    assert o2o == 1.0
    assert o2m > o2f_ > o2o
    assert o2f_ <= 7


def synthetic_image():
    """Three coloured rectangles on a dark background, one per class."""
    image = torch.full((3, 128, 128), 0.1)
    boxes = torch.tensor([[8.0, 10, 56, 50], [70.0, 16, 120, 70], [20.0, 72, 90, 118]])
    for (x1, y1, x2, y2), colour in zip(boxes.int().tolist(), torch.eye(3), strict=True):
        image[:, y1:y2, x1:x2] = colour[:, None, None]
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1, 2])}


def test_one_step_lowers_the_loss_on_a_fixed_batch():
    model = o2f.O2F(tiny_config()).train()
    image, target = synthetic_image()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = sum(model([image], [target], t=0.6).values())
    before.backward()
    opt.step()
    with torch.no_grad():
        after = sum(model([image], [target], t=0.6).values())
    assert after.item() < before.item()


def test_training_on_one_image_finds_every_box():
    torch.manual_seed(0)
    model = o2f.O2F(tiny_config(head_convs=2)).train()
    image, target = synthetic_image()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        losses = model([image], [target], t=0.2)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        (det,) = model([image])
    g = len(target["boxes"])
    top = det["boxes"][: g + 2]
    iou = box_iou(top, target["boxes"])
    same_class = det["labels"][: g + 2, None] == target["labels"][None]
    found = ((iou >= 0.5) & same_class).any(0)
    assert found.all(), f"recall {found.float().mean():.2f}"


def test_two_stage_top_k_equals_top_k_over_all_pairs():
    model = o2f.O2F(tiny_config(pre_topk=50, topk=30, num_classes=7))
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 10), (6, 5), (3, 3)]
    points, strides = make_points(shapes, [8, 16, 32], torch.device("cpu"))
    n = points.shape[0]
    out = HeadOutputs(torch.randn(2, n, 7, generator=g) * 3,
                      torch.rand(2, n, 4, generator=g) * 20, torch.randn(2, n, generator=g),
                      points, strides, shapes)
    boxes, scores, labels = model.postprocess(out, [(96, 80), (90, 70)])
    # brute force: every (point, class) pair of each level, then the best overall
    p = torch.sigmoid(out.cls_logits) * torch.sigmoid(out.obj_logits)[..., None]
    start, expected = 0, []
    for h, w in shapes:
        level = p[:, start:start + h * w].reshape(2, -1)
        expected.append(level.topk(min(50, level.shape[1]), dim=1).values)
        start += h * w
    expected = torch.cat(expected, 1).topk(30, dim=1).values
    torch.testing.assert_close(scores, expected)
    assert labels.max() < 7 and (boxes[..., 2:] >= boxes[..., :2]).all()


def test_swin_t_backbone_gives_strides_8_to_128():
    pytest.importorskip("timm")
    model = o2f.build_model("swin_1x", num_classes=5).eval()
    assert model.backbone.out_channels == [192, 384, 768]
    with torch.no_grad():
        out = model.forward_dense(torch.randn(1, 3, 224, 352))
    assert out.level_shapes == [(28, 44), (14, 22), (7, 11), (4, 6), (2, 3)]
