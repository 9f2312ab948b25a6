"""Converting the authors' MMDetection checkpoints, without running pickled code."""

import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision

from o2f.checkpoint import load_checkpoint, model_from_checkpoint
from o2f.cli import main
from o2f.convert import map_key, safe_load


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
    assert len(ours) == len(state) and {map_key(k) for k in state} == set(ours)
    # spelled out by hand, one or two of each kind: a swap of same-shaped tensors (the two
    # towers, two FPN levels, P6 and P7, two tower layers) would break these
    by_hand = {
        "backbone.conv1.weight": "backbone.stem.0.weight",
        "backbone.bn1.running_var": "backbone.stem.1.running_var",
        "backbone.layer3.5.conv2.weight": "backbone.layer3.5.conv2.weight",
        "backbone.layer4.0.downsample.1.bias": "backbone.layer4.0.downsample.1.bias",
        "neck.lateral_convs.0.conv.weight": "neck.fpn.inner_blocks.0.0.weight",
        "neck.lateral_convs.2.conv.bias": "neck.fpn.inner_blocks.2.0.bias",
        "neck.fpn_convs.1.conv.weight": "neck.fpn.layer_blocks.1.0.weight",
        "neck.fpn_convs.2.conv.weight": "neck.fpn.layer_blocks.2.0.weight",
        "neck.fpn_convs.3.conv.weight": "neck.fpn.extra_blocks.p6.weight",
        "neck.fpn_convs.4.conv.bias": "neck.fpn.extra_blocks.p7.bias",
        "bbox_head.cls_convs.0.conv.weight": "head.cls_tower.0.weight",
        "bbox_head.cls_convs.0.gn.weight": "head.cls_tower.1.weight",
        "bbox_head.cls_convs.3.conv.bias": "head.cls_tower.9.bias",
        "bbox_head.reg_convs.0.conv.weight": "head.reg_tower.0.weight",
        "bbox_head.reg_convs.2.gn.bias": "head.reg_tower.7.bias",
        "bbox_head.centerness_convs.2.conv.weight": "head.obj_tower.6.weight",
        "bbox_head.conv_cls.bias": "head.cls_out.bias",
        "bbox_head.conv_reg.weight": "head.reg_out.weight",
        "bbox_head.conv_centerness.weight": "head.obj_out.weight",
        "bbox_head.scales.0.scale": "head.scales.0.scale",
        "bbox_head.scales.4.scale": "head.scales.4.scale",
    }
    for release, our in by_hand.items():
        assert torch.equal(ours[our], state[release]), (release, our)

    # the converted head computes what the release's head computes, written here from the
    # release's keys: towers of (conv, GroupNorm(32), ReLU), distances relu(scale * x) * stride
    model, cfg, ckpt = model_from_checkpoint(out)
    assert cfg.model.num_classes == 80 and ckpt["class_names"][3] == "class3"
    batch = model.preprocess([torch.rand(3, 96, 128)])[0]

    def tower(x, name, depth):
        for i in range(depth):
            x = F.conv2d(x, state[f"bbox_head.{name}.{i}.conv.weight"],
                         state[f"bbox_head.{name}.{i}.conv.bias"], padding=1)
            x = F.group_norm(x, 32, state[f"bbox_head.{name}.{i}.gn.weight"],
                             state[f"bbox_head.{name}.{i}.gn.bias"])
            x = F.relu(x)
        return x

    def conv(x, name):
        return F.conv2d(x, state[f"bbox_head.{name}.weight"], state[f"bbox_head.{name}.bias"],
                        padding=1).flatten(2)

    with torch.no_grad():
        feats = model.neck(model.backbone(batch))
        out_dense = model.forward_dense(batch)
        start = 0
        for level, (feat, stride) in enumerate(zip(feats, (8, 16, 32, 64, 128), strict=True)):
            n = feat.shape[-2] * feat.shape[-1]
            reg = tower(feat, "reg_convs", 4)
            cls = conv(tower(feat, "cls_convs", 4), "conv_cls").transpose(1, 2)
            box = (F.relu(state[f"bbox_head.scales.{level}.scale"] * conv(reg, "conv_reg"))
                   * stride).transpose(1, 2)
            obj = conv(tower(reg, "centerness_convs", 3), "conv_centerness").transpose(1, 2)
            got = slice(start, start + n)
            torch.testing.assert_close(out_dense.cls_logits[:, got], cls, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out_dense.box_ltrb[:, got], box, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out_dense.obj_logits[:, got].reshape(obj.shape), obj,
                                       rtol=1e-4, atol=1e-5)
            start += n


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
