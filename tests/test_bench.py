"""`o2f bench` runs end to end, and BN folding keeps the outputs."""

import pytest
import torch

import o2f
from o2f.bench import count_flops, format_report, run_bench


def test_fuse_batchnorm_keeps_the_outputs():
    model = o2f.build_model("r50_1x", backbone="resnet18", backbone_weights=None,
                            num_classes=3, min_size=128, max_size=160)
    for m in model.modules():  # non-trivial statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        before = model.forward_dense(x)
        model.fuse_batchnorm()
        after = model.forward_dense(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after.cls_logits, before.cls_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after.box_ltrb, before.box_ltrb, atol=1e-3, rtol=1e-4)
    with pytest.raises(RuntimeError, match="inference"):
        model.train().fuse_batchnorm()


def test_count_flops_matches_a_count_of_every_convolution():
    # the dense network alone: the preset's rescorer (linear layers) is counted below
    model = o2f.build_model("digits", num_classes=10, rescore=False).eval()
    images = [torch.rand(3, 96, 160)]
    by_hand = []

    def conv_flops(m, inputs, out):  # 2 x multiply-adds of each output element
        c_in = m.in_channels // m.groups
        by_hand.append(2 * c_in * m.kernel_size[0] * m.kernel_size[1] * out.numel())

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_flops)
    flops = count_flops(model, images)
    assert len(by_hand) > 20  # backbone, FPN, and the head once per level
    # the digits model has convolutions only (no linear layers): the counts agree exactly
    assert flops == sum(by_hand)
    # with the rescorer its matrix products are counted too (shapes only: the seed is moot)
    assert count_flops(o2f.build_model("digits", num_classes=10).eval(), images) > flops


@pytest.mark.slow
def test_bench_reports_every_figure(tmp_path):
    report = run_bench("digits", size=(128, 160), repeats=3, work_dir=tmp_path)  # medians
    for key in ("o2f_eager_s", "o2f_onnx_s", "fcos_eager_s", "o2f_post_s", "fcos_post_s",
                "o2f_flops", "fcos_flops", "matmul_gflops"):
        assert report[key] > 0, key
    # the whole forward includes its post-processing; neither returns more than its top-k
    assert report["o2f_eager_s"] > report["o2f_post_s"]
    assert report["fcos_eager_s"] > report["fcos_post_s"]
    assert report["o2f_detections"] <= 100 and report["fcos_detections"] <= 100
    # convolution FLOPs grow with the pixels: twice the side, four times the FLOPs (the
    # dense network alone: the rescorer's work is the same at every size)
    plain = dict(repeats=1, onnx=False, fcos=False, work_dir=tmp_path,
                 overrides=["model.rescore=false"])
    single = run_bench("digits", size=(128, 160), **plain)
    double = run_bench("digits", size=(256, 320), **plain)
    assert double["o2f_flops"] / single["o2f_flops"] == pytest.approx(4, rel=0.03)
    assert report["o2f_flops"] > single["o2f_flops"]  # the preset's rescorer counted
    assert "fcos_eager_s" not in double and "o2f_onnx_s" not in double
    # the report prints the measured figures, and ratios computed from them
    text = format_report(report)
    assert f"{report['o2f_eager_s'] * 1e3:9.1f} ms" in text
    assert f"{report['o2f_flops'] / 1e9:7.1f} GFLOP" in text
    ratio = report["o2f_eager_s"] / report["fcos_eager_s"]
    assert f"ratios vs FCOS eager: o2f eager {ratio:.3f}" in text
