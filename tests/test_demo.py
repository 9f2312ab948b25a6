"""The demo path (what `make demo` runs), for a few iterations."""

import json

import yaml

from o2f.checkpoint import load_checkpoint
from o2f.data.digits import make_digits
from o2f.demo import DEMO_EPOCHS, run_demo


def test_demo_smoke(tmp_path, capsys):
    data = tmp_path / "digits"
    make_digits(data, variant="sparse", num_train=8, num_val=4, progress=False)
    metrics = run_demo(tmp_path / "demo", data_dir=data, num_pictures=2, overrides=[
        "train.max_iters=3", "train.batch_size=4", "data.num_workers=0"])
    out = tmp_path / "demo"
    # the returned metrics are the evaluation the run logged, of 3 training iterations
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics == {k: v for k, v in record.items() if k != "epoch"}
    assert load_checkpoint(out / "last.pt")["state"]["global_iter"] == 3
    assert (out / "curves.png").stat().st_size > 1000
    # pictures of the first val images, and their detections
    assert sorted(p.name for p in (out / "predictions").glob("*.png")) == [
        "val_000000.png", "val_000001.png"]
    assert len(json.loads((out / "predictions" / "detections.json").read_text())) == 2
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "digits" and config["train"]["epochs"] == DEMO_EPOCHS
    assert config["data"]["train"]["ann_file"] == str(data / "annotations/train.json")
    printed = capsys.readouterr().out
    assert f"box AP {metrics['AP']:.3f}, AP50 {metrics['AP50']:.3f}" in printed
    assert str(out / "curves.png") in printed

    # a second demo in the same folder starts afresh instead of resuming the first
    run_demo(out, data_dir=data, num_pictures=1, overrides=[
        "train.max_iters=2", "train.batch_size=4", "data.num_workers=0"])
    logged = [json.loads(x)["iter"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [2] and load_checkpoint(out / "last.pt")["state"]["global_iter"] == 2


def test_demo_epochs_and_overrides(tmp_path):
    data = tmp_path / "digits"
    make_digits(data, variant="sparse", num_train=4, num_val=2, progress=False)
    common = ["train.max_iters=1", "train.batch_size=2", "data.num_workers=0",
              "train.eval_every=0"]
    run_demo(tmp_path / "a", data_dir=data, epochs=3, num_pictures=1, overrides=common)
    run_demo(tmp_path / "b", data_dir=data, epochs=3, num_pictures=1,
             overrides=[*common, "train.epochs=4"])  # an explicit override wins
    for run, epochs in (("a", 3), ("b", 4)):
        config = yaml.safe_load((tmp_path / run / "config.yaml").read_text())
        assert config["train"]["epochs"] == epochs
