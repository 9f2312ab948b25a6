"""The command line: argument parsing of each command, and one-line errors (no traceback,
exit code 2) for every input the config or the command names that is missing or unreadable."""

import json
import os
import subprocess
import sys

import pytest
from conftest import rect_overrides

import o2f.bench
import o2f.data.digits
import o2f.demo
from o2f.cli import main


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --------------------------------------------------------------------------- inputs


def test_digits_preset_without_its_data_says_how_to_generate_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/digits here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "o2f", "train", "--config", "digits"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "o2f train: error: data/digits/annotations/train.json: annotation file not found "
        "(data.train.ann_file); generate the digits dataset with "
        "`o2f data digits --out data/digits`")
    assert not (tmp_path / "runs").exists()  # stopped before any work


def test_coco_preset_without_its_data_points_to_the_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "r50_1x"]) == 2
    one_line_error(capsys, "data/coco/annotations/instances_train2017.json: annotation file "
                           "not found (data.train.ann_file); lay COCO out under data/coco/")


@pytest.mark.parametrize("key, make, message", [
    ("data.train.ann_file", None, "annotation file not found"),
    ("data.train.ann_file", "dir",
     "annotation file not a file, nor a folder of VOC or YOLO annotations"),
    ("data.train.img_dir", None, "image folder not found"),
    ("data.train.img_dir", "file", "image folder not a folder"),
    ("data.val.ann_file", None, "annotation file not found"),
    ("data.val.img_dir", None, "image folder not found"),
])
def test_a_missing_or_unreadable_split_input_is_one_line(rectangles, tmp_path, capsys, key,
                                                         make, message):
    bad = tmp_path / "bad_input"
    if make == "dir":
        bad.mkdir()
    elif make == "file":
        bad.write_text("x")
    overrides = rect_overrides(rectangles, **{key: bad})
    assert main(["train", "--config", "digits", "--work-dir", str(tmp_path / "run"),
                 *sets(overrides)]) == 2
    one_line_error(capsys, f"{bad}: {message} ({key}); check --set {key}=")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_annotation_file_without_read_permission_is_one_line(rectangles, tmp_path, capsys):
    ann = tmp_path / "locked.json"
    ann.write_text("{}")
    ann.chmod(0)
    overrides = rect_overrides(rectangles, **{"data.train.ann_file": ann})
    assert main(["train", "--config", "digits", *sets(overrides)]) == 2
    one_line_error(capsys, f"{ann}: annotation file not readable (permission denied)")


def test_eval_checks_the_val_split_of_the_checkpoint_config(rectangles, tmp_path, capsys):
    work = tmp_path / "run"
    overrides = rect_overrides(rectangles, **{"train.max_iters": 1, "train.eval_every": 0})
    assert main(["train", "--config", "digits", "--work-dir", str(work), *sets(overrides)]) == 0
    capsys.readouterr()
    missing = tmp_path / "gone"
    assert main(["eval", "--config", "digits", "--checkpoint", str(work / "last.pt"),
                 *sets([*overrides, f"data.val.img_dir={missing}"])]) == 2
    one_line_error(capsys, f"{missing}: image folder not found (data.val.img_dir)")


def test_missing_backbone_weights_file_is_one_line(rectangles, tmp_path, capsys):
    weights = tmp_path / "resnet50.pth"
    overrides = rect_overrides(rectangles, **{"model.backbone_weights": weights})
    assert main(["train", "--config", "digits", *sets(overrides)]) == 2
    one_line_error(capsys, f"{weights}: backbone weights not found (model.backbone_weights")


@pytest.mark.parametrize("command", [
    ["eval", "--checkpoint", "{ckpt}"],
    ["predict", "--checkpoint", "{ckpt}", "{img}", "--out", "{out}"],
    ["export", "--checkpoint", "{ckpt}", "--out", "{out}/m.onnx"],
])
@pytest.mark.parametrize("kind", ["missing", "garbage"])
def test_a_missing_or_unreadable_checkpoint_is_one_line(rectangles, tmp_path, capsys, command,
                                                        kind):
    ckpt = tmp_path / "model.pt"
    if kind == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    img = next(rectangles["val"][1].glob("*.png"))
    argv = [a.format(ckpt=ckpt, img=img, out=tmp_path / "out") for a in command]
    assert main(argv) == 2
    expected = "checkpoint not found" if kind == "missing" else "cannot read checkpoint"
    one_line_error(capsys, f"o2f {command[0]}: error: {ckpt}: {expected}")


def test_resume_without_last_pt_is_one_line(rectangles, tmp_path, capsys):
    overrides = rect_overrides(rectangles)
    assert main(["train", "--config", "digits", "--work-dir", str(tmp_path), "--resume",
                 *sets(overrides)]) == 2
    one_line_error(capsys, f"{tmp_path / 'last.pt'}: nothing to resume from")


def test_a_wrong_type_for_an_optional_key_is_one_line(capsys):
    assert main(["train", "--config", "digits", "--set", "train.max_iters=abc"]) == 2
    one_line_error(capsys, "'train.max_iters' expects a int or null, got 'abc'")


# --------------------------------------------------------------------------- parsing


def test_several_pairs_after_one_set(rectangles, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("o2f.engine.train",
                        lambda cfg, work_dir, resume: seen.update(cfg=cfg, work=work_dir))
    overrides = rect_overrides(rectangles)
    assert main(["train", "--config", "digits", "--work-dir", str(tmp_path),
                 "--set", "train.epochs=5", "train.lr=0.5", "--set", *overrides[:4]]) == 0
    assert (seen["cfg"].train.epochs, seen["cfg"].train.lr) == (5, 0.5)
    assert seen["cfg"].data.val.img_dir == str(rectangles["val"][1])


def test_data_digits_arguments_reach_the_generator(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(out, **kwargs):
        calls.append((out, kwargs))
        return {"train_annotations": f"{out}/annotations/train.json"}

    monkeypatch.setattr(o2f.data.digits, "make_digits", fake)
    assert main(["data", "digits", "--out", str(tmp_path)]) == 0
    assert calls[-1] == (str(tmp_path), {"variant": "sparse", "seed": 0, "num_train": None,
                                         "num_val": None, "fmt": "coco",
                                         "single_class": False})
    assert f"train_annotations: {tmp_path}/annotations/train.json" in capsys.readouterr().out
    assert main(["data", "digits", "--out", "d", "--variant", "crowd", "--seed", "3",
                 "--train", "5", "--val", "2", "--format", "odgt", "--single-class"]) == 0
    assert calls[-1] == ("d", {"variant": "crowd", "seed": 3, "num_train": 5, "num_val": 2,
                               "fmt": "odgt", "single_class": True})
    with pytest.raises(SystemExit) as e:  # argparse: usage on stderr, exit 2
        main(["data", "digits", "--out", "d", "--variant", "dense"])
    assert e.value.code == 2 and "invalid choice: 'dense'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "digits"])  # --out is required
    assert "--out" in capsys.readouterr().err


def test_bench_arguments_reach_run_bench(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"o2f_eager_s": 0.25}

    monkeypatch.setattr(o2f.bench, "run_bench", fake)
    monkeypatch.setattr(o2f.bench, "format_report", lambda r: f"report {r['o2f_eager_s']}")
    assert main(["bench"]) == 0
    assert calls[-1] == (("r50_1x", (800, 1216), 1, 5),
                         {"onnx": True, "fcos": True, "threads": None, "paths": []})
    assert capsys.readouterr().out.strip() == "report 0.25"
    out = tmp_path / "b.json"
    assert main(["bench", "--config", "digits", "--size", "128", "160", "--batch", "2",
                 "--repeats", "3", "--threads", "1", "--no-fcos",
                 "--json", str(out)]) == 0
    assert calls[-1] == (("digits", (128, 160), 2, 3),
                         {"onnx": True, "fcos": False, "threads": 1, "paths": []})
    assert json.loads(out.read_text()) == {"o2f_eager_s": 0.25}
    assert main(["bench", "--no-onnx"]) == 0
    assert calls[-1][1] == {"onnx": False, "fcos": True, "threads": None, "paths": []}
    # --dtype / --backend become backend:dtype paths (eager and onnxruntime float32 are the
    # report's own rows; onnxruntime has no bf16, eager no int8)
    assert main(["bench", "--dtype", "fp32", "bfloat16", "int8", "--backend", "eager",
                 "onnxruntime", "openvino"]) == 0
    assert calls[-1][1]["paths"] == ["eager:bf16", "onnxruntime:int8", "openvino:float32",
                                     "openvino:bf16", "openvino:int8"]


def test_demo_arguments_reach_run_demo(monkeypatch):
    calls = []
    monkeypatch.setattr(o2f.demo, "run_demo", lambda out, **kw: calls.append((out, kw)))
    assert main(["demo"]) == 0
    assert calls[-1] == ("runs/demo", {"data_dir": "data/digits", "epochs": o2f.demo.DEMO_EPOCHS,
                                       "overrides": []})
    assert main(["demo", "--out", "o", "--data", "d", "--epochs", "2",
                 "--set", "train.lr=0.1", "train.batch_size=4", "--set", "train.seed=1"]) == 0
    assert calls[-1] == ("o", {"data_dir": "d", "epochs": 2,
                               "overrides": ["train.lr=0.1", "train.batch_size=4", "train.seed=1"]})
