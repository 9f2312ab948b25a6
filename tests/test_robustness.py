"""What a user sees on bad configs, bad checkpoints and resource exhaustion."""

import re

import pytest
import torch
from conftest import rect_overrides

from o2f.checkpoint import CheckpointError, load_checkpoint
from o2f.cli import main
from o2f.config import ConfigError, load_config
from o2f.engine import OutOfMemoryHint, train
from o2f.model.detector import O2F


def test_unknown_config_key_lists_the_closest_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lr_rate'.*train\.lr"):
        load_config("r50_1x", ["train.lr_rate=0.02"])
    with pytest.raises(ConfigError, match=r"model.num_clases.*model\.num_classes"):
        load_config("r50_1x", ["model.num_clases=3"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: r50_1x\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown config key 'train.epoch'"):
        load_config(str(path))


def test_wrong_value_type_and_unknown_preset():
    with pytest.raises(ConfigError, match="'train.epochs' expects a int, got 'many'"):
        load_config("r50_1x", ["train.epochs=many"])
    with pytest.raises(ConfigError, match="did you mean r50_1x"):
        load_config("r50-1x")
    assert load_config("r50_1x", ["train.lr=2e-2", "model.nms=true"]).train.lr == 0.02


def test_truncated_or_foreign_checkpoint_is_reported(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.randn(100, 100)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot read checkpoint"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an o2f checkpoint.*o2f convert"):
        load_checkpoint(foreign)
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err


def test_resume_without_a_checkpoint_says_so(rectangles, tmp_path):
    cfg = load_config("digits", rect_overrides(rectangles))
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        train(cfg, tmp_path, resume=True)


def test_out_of_memory_gives_a_hint(rectangles, tmp_path, monkeypatch):
    def exhausted(self, out, targets, t, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(O2F, "losses", exhausted)
    cfg = load_config("digits", rect_overrides(rectangles, **{"train.eval_every": 0}))
    with pytest.raises(OutOfMemoryHint, match=r"iteration 0 .*lower train.batch_size"):
        train(cfg, tmp_path)


@pytest.mark.parametrize("item, message", [
    ("train.max_iters=abc", "'train.max_iters' expects a int or null, got 'abc'"),
    ("train.grad_clip=high", "'train.grad_clip' expects a float or null, got 'high'"),
    ("model.nms=sometimes", "'model.nms' expects a bool or null, got 'sometimes'"),
    ("model.norm_eval=2", "'model.norm_eval' expects a bool or null, got 2"),
    ("model.backbone_weights=[1]", "'model.backbone_weights' expects a str or null"),
    ("model.num_classes=null", "'model.num_classes' expects a int, got None"),
    ("train.epochs=2.5", "'train.epochs' expects a int, got 2.5"),
    ("model.backbone=50", "'model.backbone' expects a str, got 50"),
    ("data.min_size=[640, big]", "'data.min_size' expects a list"),
])
def test_every_key_checks_its_type_optional_ones_too(item, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("r50_1x", [item])


def test_optional_keys_take_null_or_their_type():
    cfg = load_config("r50_1x", ["train.max_iters=7", "train.grad_clip=1", "model.nms=false",
                                 "model.backbone_weights=null", "train.lr=1e-3"])
    assert (cfg.train.max_iters, cfg.train.grad_clip, cfg.model.nms) == (7, 1.0, False)
    assert isinstance(cfg.train.grad_clip, float) and cfg.model.backbone_weights is None
    assert cfg.train.lr == 1e-3  # YAML reads 1e-3 as a string; it still is a float
    cfg = load_config("r50_1x", ["train.max_iters=null", "model.nms=null"])
    assert cfg.train.max_iters is None and cfg.model.nms is None
