"""The demo path (what `make demo` runs), for a few iterations."""

import yaml

from o2f.data.digits import make_digits
from o2f.demo import DEMO_EPOCHS, run_demo


def test_demo_smoke(tmp_path, capsys):
    data = tmp_path / "digits"
    make_digits(data, variant="sparse", num_train=8, num_val=4, progress=False)
    metrics = run_demo(tmp_path / "demo", data_dir=data, num_pictures=2, overrides=[
        "train.max_iters=3", "train.batch_size=4", "data.num_workers=0"])
    assert set(metrics) >= {"AP", "AP50"}
    out = tmp_path / "demo"
    assert (out / "last.pt").exists() and (out / "curves.png").stat().st_size > 1000
    assert len(list((out / "predictions").glob("*.png"))) == 2
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "digits" and config["train"]["epochs"] == DEMO_EPOCHS
    printed = capsys.readouterr().out
    assert "demo finished" in printed and str(out / "curves.png") in printed


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
