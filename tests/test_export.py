"""NMS-free ONNX export: onnxruntime gives the PyTorch detections, with one input (RGB in
[0, 1]) by default and with the earlier (normalised batch, sizes) pair behind a flag."""

import json

import numpy as np
import pytest
import torch

from o2f.checkpoint import save_checkpoint
from o2f.cli import main
from o2f.config import load_config
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


def _assert_same(onnx_out, torch_out):
    """Same detections: scores in the same order, and each detection matched one to one
    (label, score within 1e-4, box within 1e-3 px; near-equal scores may swap places)."""
    for a, b in zip(onnx_out, torch_out, strict=True):
        assert len(a["scores"]) == len(b["scores"]) > 10
        np.testing.assert_allclose(a["scores"], b["scores"].numpy(), atol=1e-4, rtol=0)
        free = list(range(len(b["scores"])))
        for label, score, box in zip(a["labels"], a["scores"], a["boxes"], strict=True):
            match = [j for j in free if b["labels"][j] == label
                     and abs(float(b["scores"][j]) - score) <= 1e-4
                     and np.abs(b["boxes"][j].numpy() - box).max() <= 1e-3]
            assert match, (label, score, box)
            free.remove(match[0])


@pytest.fixture(scope="module")
def one_input_graph(spread_model, tmp_path_factory):
    """The default export, dynamic (shared: an export takes a while)."""
    return export_onnx(spread_model, tmp_path_factory.mktemp("onnx") / "m.onnx",
                       size=(256, 320), dynamic=True)


@pytest.mark.parametrize("two_inputs", [False, True])
def test_onnx_graph_has_no_nms_and_matches_pytorch(spread_model, one_input_graph, tmp_path,
                                                   two_inputs):
    path = (export_onnx(spread_model, tmp_path / "m.onnx", size=(256, 320), dynamic=True,
                        two_inputs=True) if two_inputs else one_input_graph)
    ops = onnx_ops(path)
    assert "NonMaxSuppression" not in ops and "TopK" in ops
    detector = OnnxDetector(path)
    assert detector.cfg == spread_model.cfg and detector.two_inputs == two_inputs
    images = [torch.rand(3, 300, 350), torch.rand(3, 224, 260)]  # sizes unlike the export's
    with torch.no_grad():
        # two inputs: padded to one batch, as the model pads; one input: each image alone
        expected = (spread_model(images) if two_inputs
                    else [spread_model([img])[0] for img in images])
        _assert_same(detector(images), expected)


def test_the_default_graph_takes_one_rgb_input_and_normalises_inside(spread_model,
                                                                    one_input_graph):
    """What any ONNX consumer does: feed B x 3 x H x W in [0, 1], H and W not multiples of
    32 (nor the export's size), and read boxes in the input's pixels."""
    import onnxruntime as ort

    path = one_input_graph
    assert "Sub" in onnx_ops(path) and "Div" in onnx_ops(path)  # the normalisation
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and len(inp.shape) == 4 and inp.shape[1] == 3
    images = torch.rand(2, 3, 210, 277)
    boxes, scores, labels = session.run(None, {"images": images.numpy()})
    with torch.no_grad():  # the model on the same pixels, no resizing (native-size preset)
        expected = spread_model(list(images))
    for i in range(2):
        keep = scores[i] > spread_model.cfg.score_thresh
        np.testing.assert_allclose(scores[i][keep], expected[i]["scores"].numpy(), atol=1e-4)
        np.testing.assert_allclose(boxes[i][keep], expected[i]["boxes"].numpy(), atol=1e-3)
        assert boxes[i][keep][:, 2].max() <= 277 and boxes[i][keep][:, 3].max() <= 210


def test_export_and_predict_from_the_cli(spread_model, tmp_path):
    from PIL import Image

    cfg = load_config("digits", ["model.num_classes=4"])
    ckpt = tmp_path / "last.pt"
    save_checkpoint(ckpt, {"model": spread_model.state_dict(), "config": cfg.to_dict(),
                           "class_names": ["a", "b", "c", "d"]})
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray((np.random.default_rng(0).random((200, 240, 3)) * 255).astype(np.uint8)
                    ).save(images / "x.png")
    outputs = {}
    for name, extra in (("one", []),):  # the two-input form: the parametrised test above
        onnx_file = tmp_path / f"{name}.onnx"
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_file),
                     "--dynamic", "--size", "256", "256", *extra]) == 0
        assert main(["predict", "--onnx", str(onnx_file), str(images), "--out",
                     str(tmp_path / name), "--score-thresh", "0.0"]) == 0
        outputs[name] = json.loads((tmp_path / name / "detections.json").read_text())
    assert main(["predict", "--checkpoint", str(ckpt), str(images), "--out",
                 str(tmp_path / "eager"), "--score-thresh", "0.0"]) == 0
    b = json.loads((tmp_path / "eager" / "detections.json").read_text())[0]["detections"]
    for name, records in outputs.items():
        a = records[0]["detections"]
        assert len(a) == len(b) > 0, name
        assert [d["class"] for d in a] == [d["class"] for d in b], name
        np.testing.assert_allclose([d["box"] for d in a], [d["box"] for d in b], atol=1e-2)
