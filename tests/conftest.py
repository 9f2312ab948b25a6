import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def write_rectangles_dataset(root, num_train=24, num_val=8, size=(96, 128), seed=0):
    """A tiny COCO-format dataset: 1-3 solid rectangles per image, colour = class
    (category ids 5, 9, 11: non-contiguous on purpose)."""
    import json
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    colours = {5: (230, 40, 40), 9: (40, 200, 60), 11: (50, 80, 230)}
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            h, w = size if i % 3 else size[::-1]
            img = Image.new("RGB", (w, h), (20, 20, 20))
            draw = ImageDraw.Draw(img)
            for _ in range(rng.randint(1, 3)):
                cat = rng.choice(list(colours))
                bw, bh = rng.randint(20, 44), rng.randint(20, 44)
                x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
                draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=colours[cat])
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": cat, "bbox": [x, y, bw, bh],
                                    "area": bw * bh, "iscrowd": 0})
            name = f"{i:04d}.png"
            img.save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        ann = root / f"{split}.json"
        ann.write_text(json.dumps({"images": images, "annotations": annotations,
                                   "categories": [{"id": c, "name": f"c{c}"} for c in colours]}))
        paths[split] = (ann, root / split)
    return paths


@pytest.fixture(scope="session")
def rectangles(tmp_path_factory):
    return write_rectangles_dataset(tmp_path_factory.mktemp("rects"))


def rect_overrides(paths, **extra):
    """--set overrides that train the tiny digits model on the rectangles dataset, in
    float32 whatever the CPU (``train.amp=off``): the resume and distributed tests compare
    weights bit for bit, which is a float32 promise; tests/test_precision.py covers amp."""
    (train_ann, train_dir), (val_ann, val_dir) = paths["train"], paths["val"]
    items = {"data.train.ann_file": train_ann, "data.train.img_dir": train_dir,
             "data.val.ann_file": val_ann, "data.val.img_dir": val_dir,
             "model.num_classes": 3, "data.num_workers": 0, "train.batch_size": 4,
             "train.base_batch_size": 4, "train.warmup_iters": 5, "train.lr": 3e-3,
             "train.epochs": 2, "train.eval_every": 1, "train.log_every": 2,
             "model.head_convs": 1, "train.amp": "off", **extra}
    return [f"{k}={v}" for k, v in items.items()]
