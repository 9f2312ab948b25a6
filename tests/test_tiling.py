"""Tiled prediction: the grid, centre ownership and the merge, with a local stand-in
detector whose one-pass answer is known exactly, then the plumbing with a real O2F model."""

import json
import math

import pytest
import torch
from scipy import ndimage

import o2f
from o2f.tiling import (
    TiledDetector,
    default_overlap,
    merge_tiles,
    predict_tiled,
    tile_grid,
    tile_starts,
)


def blob_detector(images):
    """A translation-equivariant, strictly local 'detector': one box per connected bright
    region (x1y1x2y2, x2/y2 exclusive), score = the region's mean brightness."""
    out = []
    for img in images:
        mask = img[0] > 0.5
        labelled, n = ndimage.label(mask.numpy())
        boxes = [[xs.start, ys.start, xs.stop, ys.stop]
                 for ys, xs in ndimage.find_objects(labelled)]
        scores = ndimage.mean(img[0].numpy(), labelled, range(1, n + 1)) if n else []
        out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.tensor(scores, dtype=torch.float32).reshape(-1),
                    "labels": torch.zeros(n, dtype=torch.int64)})
    return out


def squares_image(height, width, boxes):
    image = torch.zeros(3, height, width)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        image[:, y1:y2, x1:x2] = 0.6 + 0.01 * (i % 30)
    return image


def as_set(det):
    return sorted(tuple(round(v) for v in b) for b in det["boxes"].tolist())


def test_tile_starts_cover_and_overlap():
    assert tile_starts(100, 128, 32) == [0]
    assert tile_starts(128, 128, 32) == [0]
    # 1000 px in tiles of 256 with at least 64 overlap: ceil(936 / 192) = 5 tiles
    starts = tile_starts(1000, 256, 64)
    assert starts == [0, 186, 372, 558, 744]
    assert starts[-1] + 256 == 1000
    assert all(a + 256 - b >= 64 for a, b in zip(starts[:-1], starts[1:], strict=True))
    for length in range(257, 3000, 37):
        s = tile_starts(length, 256, 80)
        assert s[0] == 0 and s[-1] + 256 == length
        assert all(a + 256 - b >= 80 for a, b in zip(s[:-1], s[1:], strict=True))
    with pytest.raises(ValueError):
        tile_starts(1000, 256, 256)


def test_default_overlap_rule():
    assert [default_overlap(t) for t in (512, 640, 1024, 100)] == [128, 160, 256, 32]


@pytest.mark.parametrize("shape, tile, overlap", [((300, 520), 128, 40), ((257, 300), 100, 30),
                                                  ((90, 300), 128, None)])
def test_owned_regions_cover_the_image_exactly_once(shape, tile, overlap):
    h, w = shape
    grid = tile_grid(h, w, tile, overlap)
    owned, windows = grid.owned, grid.windows
    # every pixel centre (and every half pixel) lies in exactly one owned rectangle
    ys, xs = torch.meshgrid(torch.arange(0, h, 0.5, dtype=torch.float64),
                            torch.arange(0, w, 0.5, dtype=torch.float64), indexing="ij")
    count = torch.zeros_like(xs, dtype=torch.int64)
    for k in range(len(grid)):
        x1, y1, x2, y2 = owned[k]
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        count += inside
        # owner() agrees with the rectangles, and each owned region lies in its own tile
        points = torch.stack([xs[inside], ys[inside]], 1)
        assert (grid.owner(points) == k).all()
        if inside.any():
            assert points[:, 0].min() >= windows[k, 0] and points[:, 0].max() < windows[k, 2]
            assert points[:, 1].min() >= windows[k, 1] and points[:, 1].max() < windows[k, 3]
    assert (count == 1).all()
    # the margin a tile does not own is half the overlap with the neighbour on that side
    if len(grid.xs) > 1:
        o = grid.xs[0] + grid.tile_w - grid.xs[1]
        assert owned[0, 2] == pytest.approx(grid.tile_w - o / 2)


def test_object_cut_by_a_tile_edge_is_reported_once():
    grid = tile_grid(200, 400, 200, 64)  # tiles at x 0, 100, 200; owned cuts at 150, 250
    assert grid.xs == (0, 100, 200)
    # a 40 px square across the first tile's right edge and the third tile's left edge
    square = (180, 80, 220, 120)
    image = squares_image(200, 400, [square])
    tile_views = [grid.crop(image, k) for k in range(len(grid))]
    per_tile = blob_detector(tile_views)
    seen = sum(len(d["boxes"]) for d in per_tile)
    assert seen == 3, "whole in the middle tile, cut by the edges of the other two"
    merged = predict_tiled(blob_detector, image, tile=200, overlap=64)
    assert as_set(merged) == [square]


def test_large_image_matches_one_pass():
    """With objects no larger than the overlap the merge reproduces the one-pass answer
    exactly for a local detector (the tolerance for a trained network, whose context
    reaches past a tile's edge, is measured in benchmarks/tiling.py)."""
    g = torch.Generator().manual_seed(3)
    boxes = []
    while len(boxes) < 60:
        side = int(torch.randint(8, 48, (1,), generator=g))
        x, y = (int(v) for v in torch.randint(0, 1000 - side, (2,), generator=g))
        box = (x, y, x + side, y + int(side * 0.8))
        if all(box[2] + 2 <= b[0] or b[2] + 2 <= box[0] or box[3] + 2 <= b[1]
               or b[3] + 2 <= box[1] for b in boxes):
            boxes.append(box)
    image = squares_image(1000, 1000, boxes)
    (one_pass,) = blob_detector([image])
    tiled = predict_tiled(blob_detector, image, tile=192, overlap=48, batch_size=5)
    assert as_set(tiled) == as_set(one_pass) == sorted(boxes)
    # the scores come along with their boxes, sorted
    assert torch.equal(tiled["scores"], tiled["scores"].sort(descending=True).values)


def test_merge_keeps_only_owned_centres():
    grid = tile_grid(100, 180, 100, 20)  # two tiles: x 0..100 and 80..180, cut at x = 90
    assert grid.xs == (0, 80) and grid.x_cuts.tolist() == [90.0]
    left = {"boxes": torch.tensor([[10., 10, 30, 30], [80, 10, 99, 30]]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 1])}
    # in tile pixels: centre x 85 + 80 = 165 (owned by tile 1) and 5 + 80 = 85 (tile 0's)
    right = {"boxes": torch.tensor([[80., 40, 90, 50], [0, 10, 10, 30]]),
             "scores": torch.tensor([0.7, 0.95]), "labels": torch.tensor([2, 1])}
    merged = merge_tiles(grid, [left, right])
    assert merged["boxes"].tolist() == [[10, 10, 30, 30], [80, 10, 99, 30], [160, 40, 170, 50]]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert merged["labels"].tolist() == [0, 1, 2]


def test_o2f_model_tiles_are_batched():
    model = o2f.build_model("digits", num_classes=2).eval()
    calls = []

    def counting(images):
        calls.append([tuple(i.shape) for i in images])
        return model(images)

    image = torch.rand(3, 200, 300)
    det = predict_tiled(counting, image, tile=128, overlap=32, batch_size=4)
    grid = tile_grid(200, 300, 128, 32)
    assert len(grid) == 2 * 3
    assert [len(c) for c in calls] == [4, 2]
    assert all(s == (3, 128, 128) for c in calls for s in c)
    assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"])
    centres = (det["boxes"][:, :2] + det["boxes"][:, 2:]) / 2
    assert (centres >= 0).all() and (centres[:, 0] <= 300).all() and (centres[:, 1] <= 200).all()
    # the nn.Module wrapper answers as the model does, image by image
    wrapped = TiledDetector(model, tile=128, overlap=32, batch_size=4)
    (again,) = wrapped([image])
    assert torch.allclose(again["boxes"], det["boxes"]) and math.isclose(
        float(again["scores"].sum()), float(det["scores"].sum()), rel_tol=1e-5)


def test_eval_tile_through_the_cli(rectangles, tmp_path):
    """`o2f eval --tile`: a tile as large as the images is the one-pass evaluation, to the
    detection; smaller tiles run the tiled path over the whole split."""
    from conftest import rect_overrides

    from o2f.cli import main
    from o2f.config import load_config

    # one image per batch: padding a batch of unlike sizes changes border detections
    overrides = rect_overrides(rectangles, **{"model.score_thresh": 0.0,
                                              "train.eval_batch_size": 1})
    cfg = load_config("digits", overrides)
    ckpt = tmp_path / "untrained.pt"
    torch.save({"model": o2f.build_model(cfg.model).state_dict(), "config": cfg.to_dict()}, ckpt)
    args = ["eval", "--config", "digits", "--checkpoint", str(ckpt)]
    for item in overrides:
        args += ["--set", item]
    results = {}
    for name, extra in (("plain", []), ("whole", ["--tile", "128"]),
                        ("tiled", ["--tile", "64", "--overlap", "16"])):
        out = tmp_path / f"{name}.json"
        assert main(args + extra + ["--results-out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert len(results["plain"]) > 0
    assert results["whole"] == results["plain"]
    assert results["tiled"] != results["plain"] and len(results["tiled"]) > 0
