"""The demo path (what `make demo` runs), for a few iterations."""

from o2f.data.digits import make_digits
from o2f.demo import run_demo


def test_demo_smoke(tmp_path, capsys):
    data = tmp_path / "digits"
    make_digits(data, variant="sparse", num_train=8, num_val=4, progress=False)
    metrics = run_demo(tmp_path / "demo", data_dir=data, num_pictures=2, overrides=[
        "train.max_iters=3", "train.batch_size=4", "data.num_workers=0"])
    assert set(metrics) >= {"AP", "AP50"}
    out = tmp_path / "demo"
    assert (out / "last.pt").exists() and (out / "curves.png").stat().st_size > 1000
    assert len(list((out / "predictions").glob("*.png"))) == 2
    printed = capsys.readouterr().out
    assert "demo finished" in printed and str(out / "curves.png") in printed
