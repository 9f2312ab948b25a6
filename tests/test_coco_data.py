"""COCO data: validation messages, dataset targets, decoding, transforms, collate, sampler."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from o2f.data.coco import CocoDetection, DatasetError, ImageReadError, load_image, validate_coco
from o2f.data.transforms import (
    PIXEL_MEAN,
    PIXEL_STD,
    KeepRatioResize,
    build_transforms,
    collate,
)

CATS = [{"id": 42, "name": "kite"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]


def ann(ann_id, image_id, cat, bbox, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": crowd}


def write_coco(tmp_path, images, annotations, categories=CATS, files=True):
    """images: (id, file_name, width, height); writes small RGB files unless files=False."""
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    records = []
    for img_id, name, w, h in images:
        records.append({"id": img_id, "file_name": name, "width": w, "height": h})
        if files:
            rgb = np.full((h, w, 3), (img_id * 40) % 256, np.uint8)
            Image.fromarray(rgb).save(img_dir / name)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": records, "annotations": annotations,
                                "categories": categories}))
    return path, img_dir


@pytest.fixture
def simple(tmp_path):
    images = [(1, "a.png", 64, 48), (2, "b.png", 32, 40), (3, "empty.png", 20, 20),
              (4, "crowd_only.png", 30, 30)]
    anns = [
        ann(1, 1, 42, [10, 10, 20, 10]),
        ann(2, 1, 3, [0, 0, 5, 5]),
        ann(3, 1, 7, [30, 20, 10, 10], crowd=1),
        ann(4, 2, 7, [4, 4, 8, 8]),
        ann(5, 4, 3, [1, 1, 9, 9], crowd=1),
    ]
    return write_coco(tmp_path, images, anns)


# ------------------------------------------------------------------------------ dataset


def test_label_mapping_round_trip(simple):
    ds = CocoDetection(*simple, train=False)
    assert ds.cat_ids == [3, 7, 42]
    assert ds.class_names == ["car", "train", "kite"]
    assert ds.num_classes == 3
    for label, cat_id in enumerate(ds.cat_ids):
        assert ds.label_to_cat_id(label) == cat_id
        assert ds.cat_id_to_label(cat_id) == label
    image, target = ds[0]
    assert target["labels"].tolist() == [2, 0]  # kite, car in JSON order
    assert [ds.label_to_cat_id(x) for x in target["labels"]] == [42, 3]


def test_sample_layout(simple):
    ds = CocoDetection(*simple, train=False)
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 48, 64)
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (48, 64)
    assert boxes.tolist() == [[10, 10, 30, 20], [0, 0, 5, 5]]
    assert target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (48, 64)
    assert target["ignore_boxes"].shape == (0, 4)
    assert ds.get_image_info(1)["file_name"] == "b.png"
    assert ds.image_ids == [1, 2, 3, 4]
    assert ds.aspect_ratios == pytest.approx([64 / 48, 32 / 40, 1.0, 1.0])


def test_crowd_drop_vs_exclude(simple):
    dropped = CocoDetection(*simple, train=False)[0][1]
    assert dropped["boxes"].shape == (2, 4) and dropped["ignore_boxes"].shape == (0, 4)
    excluded = CocoDetection(*simple, train=False, ignore_mode="exclude")[0][1]
    assert excluded["boxes"].tolist() == dropped["boxes"].tolist()  # crowd never a target
    assert excluded["ignore_boxes"].tolist() == [[30, 20, 40, 30]]
    assert isinstance(excluded["ignore_boxes"], tv_tensors.BoundingBoxes)
    with pytest.raises(ValueError, match="ignore_mode"):
        CocoDetection(*simple, train=False, ignore_mode="ignore")


def test_train_skips_images_without_boxes_eval_keeps_them(simple):
    assert CocoDetection(*simple, train=True).image_ids == [1, 2]  # empty, crowd-only skipped
    ds = CocoDetection(*simple, train=False)
    assert len(ds) == 4
    _, target = ds[2]
    assert target["image_id"] == 3 and target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,)


def test_boxes_partly_outside_are_clipped(tmp_path):
    anns = [ann(1, 1, 3, [-10, -5, 30, 20]), ann(2, 1, 3, [50, 40, 30, 30])]
    ds = CocoDetection(*write_coco(tmp_path, [(1, "a.png", 64, 48)], anns), train=True)
    assert ds[0][1]["boxes"].tolist() == [[0, 0, 20, 15], [50, 40, 64, 48]]


def test_degenerate_boxes_dropped_with_one_warning(tmp_path):
    images = [(1, "a.png", 64, 48), (2, "b.png", 64, 48), (3, "c.png", 64, 48)]
    anns = [ann(1, 1, 3, [10, 10, 0, 5]),  # zero width
            ann(2, 2, 3, [10, 10, 5, -3]),  # negative height
            ann(3, 2, 3, [70, 10, 5, 5]),  # entirely right of the image: empty after clipping
            ann(4, 3, 3, [1, 1, 5, 5])]
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(*write_coco(tmp_path, images, anns), train=True)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "instances.json" in msg and "dropped 3 of 4 boxes" in msg and "non-positive" in msg
    assert "a.png" in msg and "b.png" in msg
    assert ds.image_ids == [3]


def test_validate_returns_json(simple):
    data = validate_coco(*simple)
    assert data == json.loads(simple[0].read_text())  # the file's content, untouched
    assert [a["bbox"] for a in data["annotations"]][:2] == [[10, 10, 20, 10], [0, 0, 5, 5]]


# ------------------------------------------------------------------------------ bad input


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON at line 2, column 19"):
        CocoDetection(path, tmp_path, train=True)


def test_missing_top_level_key(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match=r"ann\.json: missing top-level key\(s\) categories"):
        validate_coco(path, tmp_path)


def test_missing_record_keys(tmp_path):
    path, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)],
                               [{"id": 5, "image_id": 1, "category_id": 3}])
    with pytest.raises(DatasetError, match=r"instances\.json: 1 of 1 annotations .*id=5.*'bbox'"):
        validate_coco(path, img_dir)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [], "categories": CATS}))
    with pytest.raises(DatasetError, match=r"images records miss.*'width', 'height'"):
        validate_coco(path, img_dir)


def test_unknown_image_and_category_ids(tmp_path):
    images = [(1, "a.png", 8, 8)]
    anns = [ann(1, 1, 3, [0, 0, 2, 2]), ann(2, 99, 3, [0, 0, 2, 2]), ann(3, 98, 3, [0, 0, 2, 2])]
    path, img_dir = write_coco(tmp_path, images, anns)
    with pytest.raises(DatasetError,
                       match=r"instances\.json: 2 annotations refer to unknown image ids "
                             r"\(first: 99, 98\)"):
        validate_coco(path, img_dir)
    path, img_dir = write_coco(tmp_path, images, [ann(1, 1, 5, [0, 0, 2, 2])])
    with pytest.raises(DatasetError, match=r"1 annotations refer to unknown category ids.*5"):
        validate_coco(path, img_dir)


def test_bbox_not_four_numbers(tmp_path):
    anns = [ann(1, 1, 3, [0, 0, 2, 2]), {**ann(7, 1, 3, [0, 0, 2, 2]), "bbox": [0, 0, 2]},
            {**ann(8, 1, 3, [0, 0, 2, 2]), "bbox": [0, "a", 2, 2]}]
    path, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], anns)
    with pytest.raises(DatasetError, match=r"2 annotations whose bbox is not 4 .*ids 7, 8"):
        validate_coco(path, img_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_bbox_with_nan_or_inf(tmp_path, bad):
    # Python's json module writes and reads NaN / Infinity, so such files exist
    anns = [ann(1, 1, 3, [0, 0, 2, 2]), {**ann(4, 1, 3, [0, 0, 2, 2]), "bbox": [1, 1, bad, 2]},
            {**ann(6, 1, 3, [0, 0, 2, 2]), "bbox": [bad, 0, 2, 2]}]
    path, img_dir = write_coco(tmp_path, [(1, "a.png", 8, 8)], anns)
    assert str(bad).lstrip("-") in ("nan", "inf") and ("NaN" in path.read_text()
                                                       or "Infinity" in path.read_text())
    with pytest.raises(DatasetError, match=r"2 annotations whose bbox is not 4 .*ids 4, 6"):
        validate_coco(path, img_dir)
    with pytest.raises(DatasetError, match="ids 4, 6"):
        CocoDetection(path, img_dir, train=True)


def test_missing_images_listed(tmp_path):
    images = [(i, f"img{i}.png", 8, 8) for i in range(1, 10)]
    path, img_dir = write_coco(tmp_path, images, [], files=False)
    Image.new("RGB", (8, 8)).save(img_dir / "img1.png")
    Image.new("RGB", (8, 8)).save(img_dir / "img2.png")
    with pytest.raises(DatasetError) as err:
        CocoDetection(path, img_dir, train=False)
    msg = str(err.value)
    assert "instances.json" in msg and "7 of 9 images not found" in msg
    assert "img3.png, img4.png, img5.png, img6.png, img7.png, ..." in msg
    assert "img8.png" not in msg and "img1.png" not in msg


def test_unreadable_image_listed_and_raised_when_read(tmp_path):
    path, img_dir = write_coco(tmp_path, [(1, "good.jpg", 8, 8), (2, "bad.jpg", 8, 8)], [])
    (img_dir / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=r"instances\.json: 1 of 2 images .*bad\.jpg"):
        CocoDetection(path, img_dir, train=False)
    ds = CocoDetection(path, img_dir, train=False, check_images=False)
    with pytest.raises(ImageReadError, match=r"bad\.jpg") as err:
        ds[1]
    assert isinstance(err.value, OSError)


def test_image_truncated_after_validation(tmp_path):
    path, img_dir = write_coco(tmp_path, [(1, "a.jpg", 64, 64)], [])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img_dir / "a.jpg")
    ds = CocoDetection(path, img_dir, train=False)
    data = (img_dir / "a.jpg").read_bytes()
    (img_dir / "a.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"a\.jpg"):
        ds[0]


# ------------------------------------------------------------------------------ decoding


def test_modes_converted_to_rgb_uint8(tmp_path):
    Image.new("L", (5, 4), 77).save(tmp_path / "gray.png")
    Image.new("RGBA", (5, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    pal.save(tmp_path / "palette_t.png", transparency=0)
    sixteen = np.array([[65535, 32896, 0, 257, 1000]] * 4, dtype=np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    expected = {"gray": (77, 77, 77), "rgba": (10, 20, 30), "palette": (200, 100, 50),
                "palette_t": (200, 100, 50)}
    for name, rgb in expected.items():
        img = load_image(tmp_path / f"{name}.png")
        assert img.dtype == torch.uint8 and img.shape == (3, 4, 5), name
        assert img[:, 0, 0].tolist() == list(rgb), name
    img = load_image(tmp_path / "sixteen.png")
    assert img.dtype == torch.uint8 and img.shape == (3, 4, 5)
    assert img[0, 0].tolist() == [255, 128, 0, 1, 4]  # scaled by 255 / 65535, not clipped
    assert (img[0] == img[1]).all() and (img[1] == img[2]).all()


def test_exif_rotated_jpeg(tmp_path):
    raw = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 tall
    raw[:10, :20] = (255, 0, 0)  # red top-left quadrant of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(raw).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    images = [{"id": 1, "file_name": "rot.jpg", "width": 20, "height": 40}]  # displayed size
    anns = [ann(1, 1, 3, [10, 0, 10, 20]),  # the red block as displayed
            ann(2, 1, 3, [2, 30, 10, 8])]  # below the stored height: valid only when oriented
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no size-mismatch warning
        image, target = CocoDetection(path, tmp_path, train=False)[0]
    assert image.shape == (3, 40, 20)
    shown = np.rot90(raw, k=-1)  # clockwise
    assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - shown).mean() < 4
    assert image[0, :20, 10:].float().mean() > 240 and image[0, :20, :10].float().mean() < 15
    assert target["boxes"].tolist() == [[10, 0, 20, 20], [2, 30, 12, 38]]
    assert target["orig_size"] == (40, 20)


def test_decoded_size_mismatch_warns_and_clips(tmp_path):
    path, img_dir = write_coco(tmp_path, [(1, "a.png", 64, 48)], [ann(1, 1, 3, [20, 10, 40, 30])])
    Image.new("RGB", (32, 24)).save(img_dir / "a.png")
    ds = CocoDetection(path, img_dir, train=True)
    with pytest.warns(UserWarning, match=r"a\.png: decoded size 32x24"):
        _, target = ds[0]
    assert target["boxes"].tolist() == [[20, 10, 32, 24]]


# ------------------------------------------------------------------------------ transforms


def sample(h, w, boxes, labels=None, ignore=()):
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
        "labels": torch.arange(len(boxes)) if labels is None else torch.tensor(labels),
        "image_id": 5,
        "orig_size": (h, w),
        "ignore_boxes": tv_tensors.BoundingBoxes(
            torch.tensor(ignore, dtype=torch.float32).reshape(-1, 4), format="XYXY",
            canvas_size=(h, w)),
    }
    return image, target


def test_resize_rule():
    tf = build_transforms(True, min_size=800, max_size=1333, flip=False)
    image, target = tf(*sample(480, 640, [[0, 0, 640, 480], [64, 48, 128, 96]]))
    assert image.shape == (3, 800, 1067) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    sx, sy = 1067 / 640, 800 / 480
    expected = [[0, 0, 1067, 800], [64 * sx, 48 * sy, 128 * sx, 96 * sy]]
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), torch.tensor(expected))
    assert target["boxes"].canvas_size == (800, 1067)
    # a long image: the long side is capped, scale = min(800/100, 1333/1000)
    image, _ = tf(*sample(100, 1000, [[0, 0, 10, 10]]))
    assert image.shape == (3, 133, 1333)


def test_multi_scale_range():
    resize = KeepRatioResize((640, 800), 1333)
    boxes = tv_tensors.BoundingBoxes([[0, 0, 4, 3]], format="XYXY", canvas_size=(300, 400))
    shorts = {resize(boxes).canvas_size[0] for _ in range(600)}  # boxes only: cheap
    assert shorts <= set(range(640, 801))
    assert min(shorts) <= 650 and max(shorts) >= 790 and len(shorts) > 100


def test_flip_moves_boxes_and_image_together():
    tf = build_transforms(True, min_size=None, max_size=1333, flip=True)
    image, target = sample(8, 10, [[1, 2, 4, 6]], ignore=[[0, 0, 3, 3]])
    flipped_seen = kept_seen = False
    for _ in range(30):
        out_img, out = tf(image, target)
        pixels = (out_img * 255).round().to(torch.uint8)
        if torch.equal(pixels, image):
            kept_seen = True
            assert out["boxes"].tolist() == [[1, 2, 4, 6]]
        else:
            flipped_seen = True
            assert torch.equal(pixels, image.flip(-1))
            assert out["boxes"].tolist() == [[6, 2, 9, 6]]  # x -> 10 - x
            assert out["ignore_boxes"].tolist() == [[7, 0, 10, 3]]
    assert flipped_seen and kept_seen


def test_sanitize_keeps_labels_and_ignore_boxes_apart():
    tf = build_transforms(True, min_size=None, max_size=1333, flip=False)
    boxes = [[1, 1, 5, 5], [2, 2, 2, 7], [3, 3, 9, 9]]  # the middle one has zero width
    _, out = tf(*sample(10, 10, boxes, labels=[7, 8, 9], ignore=[[0, 0, 4, 0.5], [1, 1, 6, 6]]))
    assert out["boxes"].tolist() == [[1, 1, 5, 5], [3, 3, 9, 9]]
    assert out["labels"].tolist() == [7, 9]
    assert out["ignore_boxes"].tolist() == [[1, 1, 6, 6]]  # its own mask, not the boxes'


def test_eval_transform_does_not_resize():
    tf = build_transforms(False, min_size=None)
    image, target = sample(37, 51, [[1, 2, 30, 20]])
    out_img, out = tf(image, target)
    assert out_img.shape == (3, 37, 51) and out_img.dtype == torch.float32
    assert torch.allclose(out_img * 255, image.float())
    assert out["boxes"].tolist() == [[1, 2, 30, 20]]


def test_collate_pads_to_32_and_normalises():
    tf = build_transforms(False, min_size=None)
    a = tf(*sample(40, 50, [[1, 2, 3, 4]]))
    b = tf(*sample(33, 70, [[5, 6, 7, 8], [1, 1, 9, 9]]))
    images, sizes, targets = collate([a, b])
    assert images.shape == (2, 3, 64, 96) and images.dtype == torch.float32
    assert sizes == [(40, 50), (33, 70)]
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    assert torch.allclose(images[0, :, :40, :50], (a[0] * 255 - mean) / std, atol=1e-5)
    assert torch.allclose(images[1, :, :33, :70], (b[0] * 255 - mean) / std, atol=1e-5)
    assert images[0, :, 40:].abs().sum() == 0 and images[0, :, :, 50:].abs().sum() == 0
    assert images[1, :, 33:].abs().sum() == 0
    t = targets[1]
    assert type(t["boxes"]) is torch.Tensor and type(t["ignore_boxes"]) is torch.Tensor
    assert t["boxes"].tolist() == [[5, 6, 7, 8], [1, 1, 9, 9]] and t["labels"].tolist() == [0, 1]
    assert t["size"] == (33, 70) and t["orig_size"] == (33, 70) and t["image_id"] == 5


def test_end_to_end_loader(simple):
    ds = CocoDetection(*simple, build_transforms(True, min_size=(64, 96), max_size=128),
                       train=True, ignore_mode="exclude")
    images, sizes, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert images.shape[0] == 2 and images.shape[2] % 32 == 0 and images.shape[3] % 32 == 0
    for (h, w), t in zip(sizes, targets, strict=True):
        assert 64 <= min(h, w) <= 96 and max(h, w) <= 128
        assert t["boxes"].shape[0] == t["labels"].shape[0] >= 1
        assert (t["boxes"][:, 2:] <= torch.tensor([w, h])).all()
