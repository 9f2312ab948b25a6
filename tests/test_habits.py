"""The interface as people type it: several KEY=VALUE after one --set, and no network for
ImageNet weights giving one clear message instead of a traceback."""

import urllib.error

import pytest
import torch
from conftest import rect_overrides

import o2f
from o2f.cli import build_parser, main
from o2f.config import ConfigError


def test_set_takes_several_pairs_after_one_flag_and_repeated_flags():
    parser = build_parser()
    one = parser.parse_args(["train", "--config", "digits", "--set", "train.lr=0.02",
                             "train.epochs=3", "--work-dir", "w"])
    many = parser.parse_args(["train", "--config", "digits", "--set", "train.lr=0.02",
                              "--set", "train.epochs=3"])
    mixed = parser.parse_args(["train", "--config", "digits", "--set", "train.lr=0.02",
                               "model.topk=9", "--set", "train.epochs=3"])
    assert one.overrides == many.overrides == ["train.lr=0.02", "train.epochs=3"]
    assert one.work_dir == "w"
    assert mixed.overrides == ["train.lr=0.02", "model.topk=9", "train.epochs=3"]
    from o2f.config import load_config

    cfg = load_config("digits", mixed.overrides)
    assert (cfg.train.lr, cfg.model.topk, cfg.train.epochs) == (0.02, 9, 3)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty torch hub cache."""
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_build_model_offline_names_the_weights_the_cache_and_the_way_out(offline):
    with pytest.raises(ConfigError) as info:
        o2f.build_model("r50_1x", num_classes=80)
    message = str(info.value)
    assert "ResNet50_Weights.IMAGENET1K_V1" in message and "resnet50-0676ba61.pth" in message
    assert str(offline) in message
    assert "backbone_weights=None" in message and "--set model.backbone_weights=null" in message
    assert "\n" not in message
    assert o2f.build_model("r50_1x", num_classes=80, backbone_weights=None) is not None


def test_train_cli_offline_prints_one_line_and_no_traceback(offline, rectangles, capsys):
    code = main(["train", "--config", "digits", "--set", *rect_overrides(
        rectangles, **{"model.backbone": "resnet18",
                       "model.backbone_weights": "IMAGENET1K_V1"})])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("o2f train: error: cannot load the ImageNet weights "
                          "ResNet18_Weights.IMAGENET1K_V1")
    assert "Traceback" not in err and err.count("\n") == 1
