"""The inference runtimes behind o2f.deploy.load_backend, on a small trained model.

Documented tolerances (docs/benchmarks.md, "bfloat16 and int8 on CPUs"), checked on the
detections float32 eager scores at least 0.3:
  - eager bf16: same labels, boxes within 1 px (the last regression conv, the scales and
    the decoding run in float32), scores within 0.02;
  - onnxruntime / OpenVINO float32: the eager detections to 1e-2 px;
  - int8 (QDQ): the graph keeps no NonMaxSuppression; same labels, boxes within 2 px.
"""

import json

import numpy as np
import pytest
import torch
from conftest import rect_overrides
from torchvision.io import read_image

from o2f import deploy
from o2f.cli import main
from o2f.deploy import MissingBackendError, load_backend
from o2f.export import export_onnx, onnx_ops

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(rectangles, tmp_path_factory):
    """A checkpoint of the tiny digits model trained 2 epochs on the rectangles data."""
    work = tmp_path_factory.mktemp("trained")
    args = ["train", "--config", "digits", "--work-dir", str(work)]
    for item in rect_overrides(rectangles, **{"train.eval_every": 0, "train.epochs": 4,
                                               "train.amp": "off"}):
        args += ["--set", item]
    assert main(args) == 0
    return work / "last.pt"


@pytest.fixture(scope="module")
def val_images(rectangles):
    return [read_image(str(p)).float() / 255 for p in sorted(rectangles["val"][1].glob("*.png"))]


def run(predictor, images):
    """One image at a time: a batch pads its images to a common size, which changes the
    features at their borders (the graph runtimes run differently sized images alone)."""
    return [predictor([image])[0] for image in images]


@pytest.fixture(scope="module")
def reference(trained, val_images):
    return run(load_backend("eager", trained, "float32"), val_images)


@pytest.fixture(scope="module")
def float_graph(trained, tmp_path_factory):
    from o2f.checkpoint import model_from_checkpoint

    model, _, _ = model_from_checkpoint(trained)
    return export_onnx(model, tmp_path_factory.mktemp("graph") / "m.onnx", size=(96, 128),
                       dynamic=True)


def assert_close_detections(got, expected, *, box_px, score=None, min_score=0.3):
    """Every detection of ``expected`` scoring >= min_score has one in ``got`` with its
    label and a box within ``box_px`` pixels (and its score within ``score``)."""
    checked = 0
    for g, e in zip(got, expected, strict=True):
        for box, label, s in zip(e["boxes"], e["labels"], e["scores"], strict=True):
            if s < min_score:
                continue
            same = g["labels"] == label
            assert same.any(), (label, s)
            err = (g["boxes"][same] - box).abs().max(1).values
            j = int(err.argmin())
            assert err[j] <= box_px, (float(err[j]), box, label)
            if score is not None:
                assert abs(float(g["scores"][same][j]) - float(s)) <= score
            checked += 1
    assert checked >= 8  # the trained model finds most rectangles


def test_the_trained_model_detects(reference):
    # a fixture the tolerances below are meaningful on: confident, spread detections
    assert sum(int((d["scores"] >= 0.3).sum()) for d in reference) >= 8


def test_bf16_eager_keeps_labels_and_boxes(trained, val_images, reference):
    predictor = load_backend("eager", trained, "bfloat16")
    assert predictor.description == "eager bf16"
    got = run(predictor, val_images)
    assert all(d["boxes"].dtype == torch.float32 for d in got)
    assert_close_detections(got, reference, box_px=1.0, score=0.02)


def test_eager_folds_batchnorm_and_runs_channels_last(trained):
    predictor = load_backend("eager", trained, "float32")
    modules = list(predictor.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    convs = [m for m in modules if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
               if c.kernel_size != (1, 1))
    seen = []
    convs[0].register_forward_hook(lambda m, i, out: seen.append(
        out.is_contiguous(memory_format=torch.channels_last)))
    predictor([torch.rand(3, 64, 96)])
    assert seen == [True]


@pytest.mark.slow  # compiles (tens of seconds)
def test_compiled_backend_matches_eager(trained, val_images, reference):
    predictor = load_backend("inductor", trained)  # a user's name for it
    assert predictor.description == "compiled float32"
    calls = []
    compiled = predictor.model.forward_dense
    predictor.model.forward_dense = lambda batch: calls.append(1) or compiled(batch)
    got = run(predictor, val_images)
    assert len(calls) == len(val_images)  # the network ran through torch.compile's function
    assert hasattr(compiled, "_torchdynamo_orig_callable")
    assert_close_detections(got, reference, box_px=1e-2, score=1e-4)


def test_backend_names_users_type():
    from o2f.deploy import backend_name

    assert [backend_name(n) for n in ("ORT", "onnx", "torch.compile", "ov", "PyTorch")] == [
        "onnxruntime", "onnxruntime", "compiled", "openvino", "eager"]
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        load_backend("tensorrt", torch.nn.Conv2d(1, 1, 1))


@pytest.mark.slow  # exports (about a minute on 2 busy cores)
def test_onnxruntime_backend_matches_eager(trained, float_graph, val_images, reference):
    for source in (float_graph, trained):  # an exported graph, or a checkpoint exported on the fly
        predictor = load_backend("onnxruntime", source)
        assert predictor.description == "onnxruntime float32"
        assert_close_detections(run(predictor, val_images), reference, box_px=1e-2, score=1e-4)


@pytest.mark.slow  # exports (about a minute on 2 busy cores)
def test_int8_graph_has_no_nms_and_keeps_the_detections(float_graph, rectangles, val_images,
                                                       reference, tmp_path):
    from o2f.deploy.onnxruntime import quantize_int8

    path = quantize_int8(float_graph, tmp_path / "int8.onnx", rectangles["train"][1])
    ops = onnx_ops(path)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "NonMaxSuppression" not in ops and "TopK" in ops
    predictor = load_backend("onnxruntime", path)
    assert predictor.description == "onnxruntime int8"
    assert_close_detections(run(predictor, val_images), reference, box_px=2.0)


@pytest.mark.slow  # exports (about a minute on 2 busy cores)
def test_openvino_backend_matches_eager(float_graph, val_images, reference, tmp_path):
    pytest.importorskip("openvino")
    from o2f.deploy.openvino import save_ir

    for source in (float_graph, save_ir(float_graph, tmp_path / "m.xml")):
        predictor = load_backend("openvino", source)
        assert predictor.num_classes == 3
        assert_close_detections(run(predictor, val_images), reference, box_px=1e-2, score=1e-4)


def convolutions_reaching(model, output: str) -> list:
    """The convolutions of an OpenVINO model whose values reach ``output``: the walk goes
    back through every input except a gather's indices (the scores' top-k) and stops at
    convolutions and shape reads. (OpenVINO folds the per-level scale into the box
    convolution's weights, so their name is lost and the graph must tell.)"""
    result = next(o for o in model.outputs if output in o.get_names())
    found, seen, stack = {}, set(), [result.get_node()]
    while stack:
        node = stack.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        kind = node.get_type_name()
        if kind == "Convolution":
            found[node.get_name()] = node
        elif kind not in ("ShapeOf", "Constant", "Parameter"):
            inputs = node.inputs()[:1] if kind.startswith("Gather") else node.inputs()
            stack += [i.get_source_output().get_node() for i in inputs]
    return list(found.values())


@pytest.mark.slow  # exports and calibrates (about a minute on 2 busy cores)
def test_openvino_int8_runs_the_qdq_graph_in_int8_and_keeps_the_boxes(
        float_graph, rectangles, val_images, reference, tmp_path):
    ov = pytest.importorskip("openvino")
    from o2f.deploy.openvino import quantize_int8

    path = quantize_int8(float_graph, tmp_path / "int8.xml", rectangles["train"][1])
    assert path.suffix == ".xml"
    ir = ov.Core().read_model(str(path))
    kinds = {op.get_type_name() for op in ir.get_ops()}
    assert "FakeQuantize" in kinds and "NMSRotated" not in kinds
    assert not any("NonMaxSuppression" in k for k in kinds)
    # the box convolutions stay float32: no quantised weights or inputs reach them
    box_convs = convolutions_reaching(ir, "boxes")
    assert len(box_convs) == 3  # one per FPN level of the digits preset (model.num_levels)
    assert all(op.input_value(i).get_node().get_type_name() == kind
               for op in box_convs for i, kind in ((0, "Relu"), (1, "Constant")))
    predictor = load_backend("openvino", path)
    assert predictor.description == "openvino f32 int8"
    assert_close_detections(run(predictor, val_images), reference, box_px=2.0)


def test_a_missing_runtime_is_a_one_line_error(monkeypatch, tmp_path):
    float_graph = tmp_path / "m.onnx"
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (
        (_ for _ in ()).throw(ImportError(name)) if name == "onnxruntime" else real(name, *a)))
    with pytest.raises(MissingBackendError) as e:
        load_backend("onnxruntime", float_graph)
    assert "\n" not in str(e.value) and "o2f[deploy]" in str(e.value)
    with pytest.raises(ValueError, match="choose from eager, compiled, onnxruntime, openvino"):
        load_backend("tensorrt", float_graph)
    assert deploy.BACKENDS == ("eager", "compiled", "onnxruntime", "openvino")


def test_eval_takes_dtype(trained, tmp_path):
    # the checkpoint's config names the val split
    metrics = {}
    for dtype in ("float32", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["eval", "--checkpoint", str(trained), "--dtype", dtype,
                     "--metrics-out", str(out)]) == 0
        metrics[dtype] = json.loads(out.read_text())["AP"]
    assert metrics["float32"] > 0.02  # 8 val images, a model trained for seconds
    assert abs(metrics["bf16"] - metrics["float32"]) <= 0.01


@pytest.mark.slow  # exports the checkpoint on the fly
def test_predict_with_the_onnxruntime_backend(trained, rectangles, tmp_path):
    val_dir = rectangles["val"][1]
    assert main(["predict", "--checkpoint", str(trained), str(val_dir), "--out",
                 str(tmp_path / "pred"), "--backend", "onnxruntime"]) == 0
    eager = tmp_path / "eager"
    assert main(["predict", "--checkpoint", str(trained), str(val_dir), "--out", str(eager)]) == 0
    a = json.loads((tmp_path / "pred" / "detections.json").read_text())
    b = json.loads((eager / "detections.json").read_text())
    assert [[d["class"] for d in r["detections"]] for r in a] == \
        [[d["class"] for d in r["detections"]] for r in b]
    np.testing.assert_allclose([d["box"] for r in a for d in r["detections"]],
                               [d["box"] for r in b for d in r["detections"]], atol=0.02)


def test_export_int8_needs_a_calibration_folder(trained, tmp_path):
    with pytest.raises(SystemExit, match="--int8 needs --calib"):
        main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "x.onnx"),
              "--int8"])
