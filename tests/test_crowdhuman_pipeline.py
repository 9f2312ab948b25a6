"""The CrowdHuman path end to end on the odgt digits: train, evaluate, predict."""

import json

import pytest

from o2f.cli import main
from o2f.data.digits import make_digits
from o2f.evaluation import crowdhuman_evaluate


def test_train_and_evaluate_on_odgt_digits(tmp_path):
    paths = make_digits(tmp_path / "crowd", variant="crowd", num_train=8, num_val=4,
                        fmt="odgt", progress=False)
    work = tmp_path / "run"
    overrides = {
        "data.format": "odgt", "model.num_classes": 1, "model.o2f_topk": 4,
        "model.topk": 500, "model.pre_topk": 5000,
        "data.train.ann_file": paths["train_annotations"],
        "data.train.img_dir": paths["train_images"],
        "data.val.ann_file": paths["val_annotations"], "data.val.img_dir": paths["val_images"],
        "train.epochs": 1, "train.max_iters": 3, "train.batch_size": 4,
        "train.base_batch_size": 4, "train.eval_every": 1, "data.num_workers": 0,
        "model.head_convs": 1, "model.score_thresh": 0.0}
    args = ["train", "--config", "digits", "--work-dir", str(work)]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    record = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) == {"AP", "MR", "recall", "JI", "epoch"}
    assert 0 <= record["AP"] <= 1 and 0 <= record["MR"] <= 1 and 0 <= record["JI"] <= 1

    metrics_out, dets_out = tmp_path / "m.json", tmp_path / "dets.odgt"
    assert main(["eval", "--checkpoint", str(work / "last.pt"), "--metrics-out",
                 str(metrics_out), "--results-out", str(dets_out)]) == 0
    metrics = json.loads(metrics_out.read_text())
    assert metrics == {k: record[k] for k in ("AP", "MR", "recall", "JI")}
    # the written detections are the ones scored: one record per val image (named as in
    # the ground truth), boxes x, y, w, h, and scoring the file again gives the metrics
    records = [json.loads(x) for x in dets_out.read_text().splitlines()]
    gt_ids = [json.loads(x)["ID"] for x in paths["val_annotations"].read_text().splitlines()]
    assert sorted(r["ID"] for r in records) == sorted(gt_ids)
    boxes = [d["box"] for r in records for d in r["dtboxes"]]
    assert boxes and all(len(b) == 4 and b[2] >= 0 and b[3] >= 0 for b in boxes)
    assert len(boxes) <= 500 * len(records)  # model.topk per image
    again = crowdhuman_evaluate(paths["val_annotations"], dets_out)
    assert again == pytest.approx(metrics, abs=1e-6)
    assert main(["predict", "--checkpoint", str(work / "last.pt"),
                 str(paths["val_images"]), "--out", str(tmp_path / "pred")]) == 0
    predicted = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert sorted(r["file"] for r in predicted) == sorted(
        str(f) for f in paths["val_images"].glob("*.png"))  # train and val share Images/
