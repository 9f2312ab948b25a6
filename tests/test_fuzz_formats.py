"""Bad input at scale: hypothesis mutates valid annotation files of every format (wrong
types, missing keys, negative / NaN / huge numbers, duplicated records, unknown classes,
broken encodings, truncation, images missing or unreadable) and the loader must either load
with the documented handling (every box finite, inside its image, of positive size, with a
known label) or stop with a one-line DatasetError / ImageReadError naming the file: never
another exception, never a silent wrong box.

``O2F_FUZZ_EXAMPLES=N`` runs N examples per format; ``O2F_FUZZ_REPORT=file.json`` writes
the outcome counts (docs/robustness.md quotes them).
"""

import json
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_formats import WRITERS, _images  # noqa: E402

from o2f.config import load_config  # noqa: E402
from o2f.data import build_dataset  # noqa: E402
from o2f.data.coco import DatasetError, ImageReadError  # noqa: E402

EXAMPLES = int(os.environ.get("O2F_FUZZ_EXAMPLES", "40"))
OUTCOMES: Counter = Counter()
MUTATIONS = ("truncate", "number", "delete_line", "duplicate_line", "bad_bytes", "unknown_class",
             "rename_key", "missing_image", "unreadable_image", "wrong_type")
BAD_NUMBERS = ("-5", "0", "nan", "NaN", "inf", "-inf", "1e308", "99999999", "abc", "", "1.5",
               "-0.0", "true", "null", "[]", "3e", "0x10")


def write_odgt(root):
    _images(root / "Images")
    from test_formats import IMAGES, NAMES  # one class: everything is a person

    lines = []
    for name, w, h, objs in IMAGES:
        boxes = [{"tag": "person", "fbox": [x1, y1, x2 - x1, y2 - y1], "extra": {"ignore": 0}}
                 for _, x1, y1, x2, y2 in objs]
        lines.append(json.dumps({"ID": name[:-4], "width": w, "height": h, "gtboxes": boxes}))
    assert NAMES
    (root / "train.odgt").write_text("\n".join(lines) + "\n")
    return root / "train.odgt"


WRITERS_ALL = {**WRITERS, "odgt": write_odgt}
# the file whose text is mutated, relative to the dataset root
TARGET = {"coco": "annotations/train.json", "odgt": "train.odgt", "voc": "Annotations/a.xml",
          "yolo": "labels/train/a.txt", "csv": "boxes.csv"}
IMAGE_DIR = {"coco": "images", "odgt": "Images", "voc": "JPEGImages", "yolo": "images/train",
             "csv": "imgs"}


@pytest.fixture(scope="module")
def pristine():
    """One valid dataset per format, copied for every example."""
    root = Path(tempfile.mkdtemp(prefix="o2f-fuzz-"))
    made = {fmt: write(root / fmt) for fmt, write in WRITERS_ALL.items()}
    (root / "yolo" / "data.yaml").write_text(
        (root / "yolo" / "data.yaml").read_text() + "val: images/train\n")
    yield root, made
    shutil.rmtree(root, ignore_errors=True)
    report = os.environ.get("O2F_FUZZ_REPORT")
    if report:
        table: dict = {}
        for (fmt, kind, outcome), n in sorted(OUTCOMES.items()):
            table.setdefault(fmt, {}).setdefault(kind, {})[outcome] = n
        Path(report).write_text(json.dumps(table, indent=1) + "\n")


def mutate(text: bytes, kind: str, data: st.DataObject, fmt: str) -> bytes:
    s = text.decode("utf-8")
    if kind == "truncate":
        return text[:data.draw(st.integers(0, max(len(text) - 1, 0)), label="cut")]
    if kind == "bad_bytes":
        at = data.draw(st.integers(0, len(text)), label="at")
        junk = data.draw(st.sampled_from([b"\xff\xfe", b"\x80", b"\x00", b"\xc3\x28"]))
        return text[:at] + junk + text[at:]
    if kind == "number":
        spans = [m.span() for m in re.finditer(r"-?\d+(\.\d+)?(e-?\d+)?", s)]
        if not spans:
            return text
        a, b = data.draw(st.sampled_from(spans), label="number")
        return (s[:a] + data.draw(st.sampled_from(BAD_NUMBERS), label="value") + s[b:]).encode()
    if kind in ("delete_line", "duplicate_line"):
        lines = s.splitlines(keepends=True)
        if not lines:
            return text
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        lines[i:i + 1] = [] if kind == "delete_line" else [lines[i], lines[i]]
        return "".join(lines).encode()
    if kind == "unknown_class":
        pattern = {"yolo": r"^\d+", "odgt": r'"person"'}.get(fmt, r"zebra|apple|mango|\"id\": 1\d")
        spans = [m.span() for m in re.finditer(pattern, s, flags=re.M)]
        if not spans:
            return text
        a, b = data.draw(st.sampled_from(spans), label="class")
        new = {"yolo": "7", "odgt": '"car"'}.get(fmt, "okapi" if fmt != "coco" else '"id": 99')
        return (s[:a] + new + s[b:]).encode()
    if kind == "rename_key":
        keys = [m.span(1) for m in re.finditer(r'"(\w+)":|<(\w+)>|^(\w+),', s, flags=re.M)]
        keys = [k for k in keys if k[0] >= 0]
        if not keys:
            return text
        a, b = data.draw(st.sampled_from(keys), label="key")
        return (s[:a] + "xx" + s[b:]).encode()
    if kind == "wrong_type":
        spans = [m.span() for m in re.finditer(r"\[[^\[\]]*\]|-?\d+(\.\d+)?", s)]
        if not spans:
            return text
        a, b = data.draw(st.sampled_from(spans), label="value")
        new = data.draw(st.sampled_from(['"7"', "{}", "[1, 2]", "[]", '"a"', "true", "null"]))
        return (s[:a] + new + s[b:]).encode()
    return text


def load_everything(fmt: str, ann: Path) -> list:
    cfg = load_config("digits", [f"data.val.ann_file={ann}", "data.val.img_dir=",
                                 f"data.val.format={fmt}"])
    if fmt in ("coco", "odgt"):
        cfg.data.val.img_dir = str(ann.parent.parent / "images" if fmt == "coco"
                                   else ann.parent / "Images")
    dataset = build_dataset(cfg, "val")
    return [(dataset[i], dataset.num_classes) for i in range(len(dataset))]


def check_outcome(fmt: str, kind: str, ann: Path, named: set[str]) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = load_everything(fmt, ann)
    except (DatasetError, ImageReadError) as e:
        message = str(e)
        assert "\n" not in message, message
        assert any(n in message for n in named), (named, message)
        return "error"
    for (image, target), num_classes in samples:
        boxes = target["boxes"].as_subclass(torch.Tensor)
        h, w = image.shape[-2:]
        assert torch.isfinite(boxes).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        labels = target["labels"]
        assert ((labels >= 0) & (labels < num_classes)).all()
    return "loaded"


@pytest.mark.parametrize("fmt", sorted(WRITERS_ALL))
def test_mutated_files_load_or_fail_with_one_line_naming_the_file(pristine, fmt):
    root, made = pristine

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(MUTATIONS), data=st.data())
    def run(kind, data):
        work = Path(tempfile.mkdtemp(prefix="o2f-fuzz-case-"))
        try:
            shutil.copytree(root / fmt, work / fmt)
            base = work / fmt
            ann = base / made[fmt].relative_to(root / fmt)
            target = base / TARGET[fmt]
            named = {target.name, ann.name}
            if kind in ("missing_image", "unreadable_image"):
                image = base / IMAGE_DIR[fmt] / data.draw(st.sampled_from(["a.png", "b.png",
                                                                            "c.png"]))
                named.add(image.name)
                if kind == "missing_image":
                    image.unlink()
                else:
                    image.write_bytes(image.read_bytes()[:data.draw(st.integers(0, 60))])
            else:
                target.write_bytes(mutate(target.read_bytes(), kind, data, fmt))
            OUTCOMES[fmt, kind, check_outcome(fmt, kind, ann, named)] += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()
