"""Mixed precision: train.amp=auto turns bfloat16 on where the CPU (or GPU) has native
bfloat16 matrix units and falls back to float32 elsewhere with one log line; the autocast
region really runs the convolutions in bfloat16 while the box distances stay float32."""

import logging

import pytest
import torch
from conftest import rect_overrides

from o2f import precision
from o2f.config import ConfigError, load_config
from o2f.precision import CpuFeatures, parse_dtype, resolve_amp

AMX = CpuFeatures("AVX512", amx_bf16=True, avx512_bf16=True, vnni=True, name="Xeon (mock)")
ZEN4 = CpuFeatures("AVX512", amx_bf16=False, avx512_bf16=True, vnni=True, name="EPYC (mock)")
AVX2 = CpuFeatures("AVX2", amx_bf16=False, avx512_bf16=False, vnni=False, name="AVX2 (mock)")


def _mock_cpu(monkeypatch, features):
    monkeypatch.setattr(precision, "cpu_features", lambda: features)


@pytest.mark.parametrize(("features", "expected"),
                         [(AMX, torch.bfloat16), (ZEN4, torch.bfloat16), (AVX2, None)])
def test_auto_is_bf16_only_with_native_bf16_matrix_units(monkeypatch, caplog, features,
                                                         expected):
    _mock_cpu(monkeypatch, features)
    with caplog.at_level(logging.INFO, logger="o2f"):
        assert resolve_amp("auto", "cpu") is expected
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision")]
    assert len(lines) == 1 and features.name in lines[0]
    assert ("bfloat16 autocast" if expected else "float32") in lines[0]


def test_explicit_choices_and_old_booleans(monkeypatch):
    _mock_cpu(monkeypatch, AVX2)
    assert resolve_amp("off", "cpu") is None
    assert resolve_amp("bf16", "cpu") is torch.bfloat16  # asked for: emulated, still honoured
    assert resolve_amp(False, "cpu") is None
    _mock_cpu(monkeypatch, AMX)
    assert resolve_amp(True, "cpu") is torch.bfloat16  # the old `amp: true` means auto
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_amp("fp16", "cpu")
    with pytest.raises(ConfigError, match="auto, bf16, fp16, off"):
        resolve_amp("int8", "cpu")
    # YAML reads `off` and `true` as booleans; the config keeps the words
    assert load_config("digits", ["train.amp=off"]).train.amp == "off"
    assert load_config("digits", ["train.amp=true"]).train.amp == "auto"
    assert load_config("digits").train.amp == "auto"
    assert parse_dtype("bfloat16") is parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="float32 or bf16"):
        parse_dtype("int4")


def test_cpu_features_fall_back_to_the_kernel_flags(monkeypatch):
    monkeypatch.setattr(precision, "_torch_probe", lambda name: None)
    monkeypatch.setattr(precision, "_cpuinfo",
                        lambda: ({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"}, "Zen 4"))
    f = precision.cpu_features()
    assert f.avx512_bf16 and f.vnni and not f.amx_bf16 and f.native_bf16
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ({"avx2", "amx_bf16", "amx_tile"}, "X"))
    assert precision.cpu_features().amx_bf16
    monkeypatch.setattr(precision, "_cpuinfo", lambda: ({"avx2", "fma"}, "old"))
    f = precision.cpu_features()
    assert not f.native_bf16 and "no bf16/int8 matrix units" in f.describe()


def test_cuda_auto_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU (mock)")
    assert resolve_amp("auto", "cuda") is torch.bfloat16
    assert resolve_amp("fp16", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_amp("auto", "cuda") is None
    # the region the engine opens for CUDA is a CUDA autocast of that dtype
    region = precision.autocast(torch.device("cuda"), torch.bfloat16)
    assert region.device == "cuda" and region.fast_dtype is torch.bfloat16
    assert not precision.autocast("cuda", None)._enabled


def _train_and_watch(monkeypatch, rectangles, tmp_path, features):
    """Train 2 iterations with the CPU mocked; return the dtypes seen inside the forward:
    a backbone conv's output, the last regression conv's output and the classification
    logits the head returns."""
    import o2f.engine as engine
    from o2f.cli import main

    _mock_cpu(monkeypatch, features)
    seen: dict[str, set] = {"conv": set(), "box": set(), "cls": set()}
    build = engine.create_model

    def create_model(cfg):
        model = build(cfg)
        conv = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype))

        model.head.reg_out.register_forward_hook(lambda m, i, out: seen["box"].add(out.dtype))
        model.head.register_forward_hook(lambda m, i, out: seen["cls"].add(out[0].dtype))
        return model

    monkeypatch.setattr(engine, "create_model", create_model)
    overrides = rect_overrides(rectangles, **{"train.max_iters": 2, "train.eval_every": 0,
                                                "train.amp": "auto"})
    args = ["train", "--config", "digits", "--work-dir", str(tmp_path)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    return seen, (tmp_path / "train.log").read_text()


def test_training_autocast_is_bf16_on_a_bf16_cpu(monkeypatch, rectangles, tmp_path):
    seen, log_text = _train_and_watch(monkeypatch, rectangles, tmp_path, AMX)
    assert seen == {"conv": {torch.bfloat16}, "box": {torch.float32}, "cls": {torch.float32}}
    assert "precision: bfloat16 autocast (train.amp=auto: Xeon (mock)" in log_text


def test_training_stays_float32_on_an_avx2_cpu(monkeypatch, rectangles, tmp_path):
    seen, log_text = _train_and_watch(monkeypatch, rectangles, tmp_path, AVX2)
    assert seen == {"conv": {torch.float32}, "box": {torch.float32}, "cls": {torch.float32}}
    assert log_text.count("precision: float32 (train.amp=auto: AVX2 (mock)") == 1
