"""NMS-free ONNX export: onnxruntime gives the PyTorch detections."""

import json

import numpy as np
import pytest
import torch

from o2f.cli import main
from o2f.config import load_config
from o2f.engine import save_checkpoint
from o2f.export import OnnxDetector, export_onnx, onnx_ops
from o2f.model.detector import O2F

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def spread_model():
    """A small random model whose scores are spread out (no near-ties in the top-k)."""
    torch.manual_seed(0)
    cfg = load_config("digits", ["model.num_classes=4"]).model
    model = O2F(cfg).eval()
    torch.nn.init.normal_(model.head.cls_out.weight, std=0.5)
    torch.nn.init.normal_(model.head.reg_out.weight, std=0.3)
    return model


def test_onnx_graph_has_no_nms_and_matches_pytorch(spread_model, tmp_path):
    path = export_onnx(spread_model, tmp_path / "m.onnx", size=(256, 320), dynamic=True)
    ops = onnx_ops(path)
    assert "NonMaxSuppression" not in ops and "TopK" in ops
    detector = OnnxDetector(path)
    assert detector.cfg == spread_model.cfg
    images = [torch.rand(3, 300, 350), torch.rand(3, 224, 260)]  # sizes unlike the export's
    onnx_out = detector(images)
    with torch.no_grad():
        torch_out = spread_model(images)
    for a, b in zip(onnx_out, torch_out, strict=True):
        assert len(a["scores"]) == len(b["scores"]) > 10
        np.testing.assert_array_equal(a["labels"], b["labels"].numpy())
        np.testing.assert_allclose(a["scores"], b["scores"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(a["boxes"], b["boxes"].numpy(), atol=1e-3, rtol=0)


def test_export_and_predict_from_the_cli(spread_model, tmp_path):
    from PIL import Image

    cfg = load_config("digits", ["model.num_classes=4"])
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"model": spread_model.state_dict(), "config": cfg.to_dict(),
                           "class_names": ["a", "b", "c", "d"]})
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_file),
                 "--dynamic", "--size", "256", "256"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((200, 240, 3)) * 255).astype(np.uint8)
                    ).save(images / "x.png")
    for flag, path, out in (("--onnx", onnx_file, "a"), ("--checkpoint", ckpt, "b")):
        assert main(["predict", flag, str(path), str(images), "--out", str(tmp_path / out),
                     "--score-thresh", "0.0"]) == 0
    a = json.loads((tmp_path / "a" / "detections.json").read_text())[0]["detections"]
    b = json.loads((tmp_path / "b" / "detections.json").read_text())[0]["detections"]
    assert len(a) == len(b) > 0
    assert [d["class"] for d in a] == [d["class"] for d in b]
    np.testing.assert_allclose([d["box"] for d in a], [d["box"] for d in b], atol=1e-2)
