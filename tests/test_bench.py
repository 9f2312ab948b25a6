"""`o2f bench` runs end to end, and BN folding keeps the outputs."""

import pytest
import torch

import o2f
from o2f.bench import format_report, run_bench


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


@pytest.mark.slow
def test_bench_reports_every_figure(tmp_path):
    report = run_bench("digits", size=(128, 160), repeats=1, work_dir=tmp_path)
    for key in ("o2f_eager_s", "o2f_onnx_s", "fcos_eager_s", "o2f_post_s", "fcos_post_s",
                "o2f_flops", "fcos_flops", "matmul_gflops"):
        assert report[key] > 0, key
    assert report["fcos_flops"] > report["o2f_flops"]  # R-50 FCOS vs the tiny digits model
    text = format_report(report)
    assert "ratios vs FCOS eager" in text and "GFLOP/s" in text
