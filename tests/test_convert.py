"""Converting the authors' MMDetection checkpoints, without running pickled code."""

import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torchvision

from o2f.cli import main
from o2f.convert import map_key, safe_load
from o2f.engine import load_checkpoint, model_from_checkpoint
from o2f.model.detector import O2F


def release_keys_r50(num_classes=80):
    """The release's key set for R-50 + FPN + O2F head, with shapes."""
    shapes = {}
    for k, v in torchvision.models.resnet50().state_dict().items():
        if not k.startswith("fc."):
            shapes[f"backbone.{k}"] = v.shape
    for i, c in enumerate((512, 1024, 2048)):
        shapes[f"neck.lateral_convs.{i}.conv.weight"] = (256, c, 1, 1)
        shapes[f"neck.lateral_convs.{i}.conv.bias"] = (256,)
    for i in range(5):
        shapes[f"neck.fpn_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        shapes[f"neck.fpn_convs.{i}.conv.bias"] = (256,)
        shapes[f"bbox_head.scales.{i}.scale"] = ()
    for tower, depth, c_in, c_out in (("cls_convs", 4, 256, 256), ("reg_convs", 4, 256, 256),
                                      ("centerness_convs", 3, 256, 64)):
        for i in range(depth):
            shapes[f"bbox_head.{tower}.{i}.conv.weight"] = (c_out, c_in if i == 0 else c_out,
                                                            3, 3)
            shapes[f"bbox_head.{tower}.{i}.conv.bias"] = (c_out,)
            shapes[f"bbox_head.{tower}.{i}.gn.weight"] = (c_out,)
            shapes[f"bbox_head.{tower}.{i}.gn.bias"] = (c_out,)
    for name, c_in, c_out in (("conv_cls", 256, num_classes), ("conv_reg", 256, 4),
                              ("conv_centerness", 64, 1)):
        shapes[f"bbox_head.{name}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"bbox_head.{name}.bias"] = (c_out,)
    return shapes


class ConfigDict(dict):
    """Plays mmcv's ConfigDict in the fake release file."""


class Payload:
    """Would create a file when unpickled for real."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (subprocess.call, (["touch", self.target],))


class OsPayload(Payload):
    def __reduce__(self):
        return (os.makedirs, (self.target,))


@pytest.fixture()
def release_file(tmp_path, monkeypatch):
    fake = types.ModuleType("mmcv.utils.config")
    ConfigDict.__module__ = "mmcv.utils.config"
    fake.ConfigDict = ConfigDict
    for name in ("mmcv", "mmcv.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mmcv.utils.config", fake)
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, shape in release_keys_r50().items():
        if k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            state[k] = torch.rand(shape, generator=g) + 0.5
        else:
            state[k] = torch.randn(shape, generator=g) * 0.05
    pwned = tmp_path / "pwned"
    meta = {"CLASSES": tuple(f"class{i}" for i in range(80)), "epoch": 12,
            "config": ConfigDict(model="o2f"), "hook_msgs": Payload(str(pwned))}
    path = tmp_path / "r50_1x.pth"
    torch.save({"state_dict": state, "meta": meta}, path)
    return path, state, pwned


def test_release_file_is_refused_by_plain_weights_only(release_file):
    path, _, pwned = release_file
    with pytest.raises(Exception, match="weights_only"):
        torch.load(path, weights_only=True)
    obj, replaced = safe_load(path)
    assert any(n.endswith(".call") for n in replaced)  # subprocess.call, stood in for
    assert "mmcv.utils.config.ConfigDict" in replaced
    assert not pwned.exists()  # the payload never ran
    assert obj["meta"]["epoch"] == 12


def test_convert_maps_every_key_and_keeps_the_outputs(release_file, tmp_path, capsys):
    path, state, pwned = release_file
    out = tmp_path / "o2f_r50_1x.pt"
    assert main(["convert", "--mmdet", str(path), "--out", str(out)]) == 0
    assert not pwned.exists()
    printed = capsys.readouterr().out
    assert "mmcv.utils.config.ConfigDict" in printed and "not used" not in printed
    ours = load_checkpoint(out)["model"]
    assert {map_key(k) for k in state} == set(ours)  # one to one, nothing left over
    for k, v in state.items():
        torch.testing.assert_close(ours[map_key(k)], v, rtol=0, atol=0)

    # the converted model computes what a model holding those weights directly computes
    model, cfg, ckpt = model_from_checkpoint(out)
    assert cfg.model.num_classes == 80 and ckpt["class_names"][3] == "class3"
    reference = O2F(cfg.model).eval()
    reference.load_state_dict({map_key(k): v for k, v in state.items()})
    image = [torch.rand(3, 96, 128)]
    with torch.no_grad():
        a, b = model.forward_dense(model.preprocess(image)[0]), reference.forward_dense(
            reference.preprocess(image)[0])
    torch.testing.assert_close(a.cls_logits, b.cls_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.box_ltrb, b.box_ltrb, rtol=0, atol=0)


def test_a_payload_calling_os_is_refused_before_anything_runs(tmp_path):
    from o2f.convert import convert_mmdet

    target = tmp_path / "made"
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {"bbox_head.conv_cls.weight": torch.zeros(1)},
                "meta": {"x": OsPayload(str(target))}}, path)
    with pytest.raises(ValueError, match="os.makedirs"):
        convert_mmdet(path, tmp_path / "out.pt")
    assert not target.exists()


def test_a_payload_reaching_builtins_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (getattr, (pathlib.Path(tmp_path / "x"), "touch"))

    path = tmp_path / "bad.pth"
    torch.save({"state_dict": {}, "meta": Sneaky()}, path)
    with pytest.raises(ValueError, match="builtins.getattr"):
        safe_load(path)
