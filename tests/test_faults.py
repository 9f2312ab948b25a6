"""Training that survives faults: kills, interrupted saves, NaN losses, corrupted images."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import rect_overrides, write_rectangles_dataset

import o2f.engine as engine
from o2f.checkpoint import load_checkpoint, save_checkpoint
from o2f.config import load_config
from o2f.engine import NonFiniteLossError, train
from o2f.model.detector import O2F


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_rectangles_dataset(tmp_path_factory.mktemp("faults"), num_train=24, num_val=4)


def train_cmd(work_dir, overrides, resume=False):
    cmd = [sys.executable, "-m", "o2f", "train", "--config", "digits", "--work-dir",
           str(work_dir)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def kill_in_epoch_2(cmd: list[str], checkpoint, env: dict) -> dict:
    """Start a training run, SIGKILL it once a checkpoint in the middle of its second epoch
    exists, and return the state of the checkpoint it left."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    mid_epoch = False
    while time.time() < deadline and proc.poll() is None:
        try:  # wait until a checkpoint in the middle of epoch 2 exists
            state = load_checkpoint(checkpoint)["state"]
        except Exception:
            state = None
        if state and state["epoch"] == 1 and state["iter_in_epoch"] >= 2:
            mid_epoch = True
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mid_epoch, "no checkpoint in the middle of epoch 2 before the deadline or the end"
    return load_checkpoint(checkpoint)["state"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(data, tmp_path):
    overrides = rect_overrides(data, **{"train.epochs": 3, "train.eval_every": 0,
                                        "train.ckpt_every": 1, "data.num_workers": 1})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_cmd(tmp_path / "full", overrides), check=True, capture_output=True,
                   env=env, timeout=600)

    iters_per_epoch = 6  # 24 images, 4 per batch
    for attempt in range(3):  # on a loaded machine the kill can land after the epoch's end
        work = tmp_path / f"killed{attempt}"
        killed_at = kill_in_epoch_2(train_cmd(work, overrides), work / "last.pt", env)
        if 2 <= killed_at["iter_in_epoch"] < iters_per_epoch:
            break
    assert killed_at["epoch"] == 1 and 2 <= killed_at["iter_in_epoch"] < iters_per_epoch, (
        f"the kill did not land mid-epoch in 3 attempts: {killed_at}")
    log_file = work / "log.jsonl"
    logged_before = len(log_file.read_text().splitlines())
    subprocess.run(train_cmd(work, overrides, resume=True), check=True, capture_output=True,
                   env=env, timeout=600)
    # the resumed run went on from the killed run's checkpoint instead of starting over
    resumed = [json.loads(x)["iter"] for x in log_file.read_text().splitlines()[logged_before:]]
    start = killed_at["global_iter"]
    assert resumed == list(range(start + 2 - start % 2, 3 * iters_per_epoch + 1, 2)), (
        start, resumed)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(work / "last.pt")
    assert a["state"] == b["state"]
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0, msg=key)


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 partial bytes of a checkpoint")
        raise KeyboardInterrupt  # the process is stopped in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "step": 2})
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))


def nan_at(iteration):
    """Patch the model's losses so that the given global iteration returns NaN."""
    original = O2F.losses
    calls = {"n": 0}

    def losses(self, out, targets, t, **kwargs):
        result = original(self, out, targets, t, **kwargs)
        calls["n"] += 1
        if calls["n"] == iteration + 1:
            result["loss_cls"] = result["loss_cls"] * float("nan")
        return result

    return losses


def test_a_nan_loss_stops_the_run_naming_the_iteration_and_keeps_the_checkpoint(
        data, tmp_path, monkeypatch):
    cfg = load_config("digits", rect_overrides(data, **{"train.eval_every": 0,
                                                        "train.epochs": 3}))
    monkeypatch.setattr(O2F, "losses", nan_at(8))  # epoch 2 (6 batches an epoch)
    with pytest.raises(NonFiniteLossError, match=r"iteration 8 .*loss_cls=nan"):
        train(cfg, tmp_path)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["state"]["epoch"] == 1 and ckpt["state"]["global_iter"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_skip_nonfinite_skips_and_counts(data, tmp_path, monkeypatch):
    cfg = load_config("digits", rect_overrides(data, **{
        "train.eval_every": 0, "train.epochs": 2, "train.skip_nonfinite": True}))
    monkeypatch.setattr(O2F, "losses", nan_at(3))
    train(cfg, tmp_path)
    logs = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["skipped_nonfinite"] == 1 and logs[-1]["iter"] == 12
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_an_image_corrupted_after_validation_is_replaced_and_counted(data, tmp_path, caplog):
    root = tmp_path / "copy"
    paths = write_rectangles_dataset(root, num_train=12, num_val=4)
    cfg = load_config("digits", rect_overrides(paths, **{"train.eval_every": 0,
                                                         "train.epochs": 1}))
    bad = root / "train" / "0003.png"
    original_build = engine.build_dataset

    def build_then_corrupt(cfg, split):
        dataset = original_build(cfg, split)  # validated: every image readable
        if split == "train":
            bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        return dataset

    engine.build_dataset = build_then_corrupt
    try:
        with caplog.at_level("WARNING", logger="o2f"):
            train(cfg, tmp_path / "run")
    finally:
        engine.build_dataset = original_build
    assert "0003.png" in caplog.text and "unreadable" in caplog.text
    logs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logs[-1]["replaced_images"] >= 1
