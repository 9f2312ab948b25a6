"""Training, evaluation and prediction through the command line, resume, and the recipes."""

import json

import pytest
import torch
from conftest import rect_overrides

from o2f.checkpoint import load_checkpoint, model_from_checkpoint
from o2f.cli import main
from o2f.config import load_config
from o2f.data import build_dataset
from o2f.engine import base_lr, epoch_batches, evaluate, lr_factor
from o2f.model.detector import O2F


def sets(items):
    return [arg for item in items for arg in ("--set", item)]


def test_train_eval_predict_through_the_cli(rectangles, tmp_path):
    overrides = rect_overrides(rectangles, **{"train.epochs": 2, "train.eval_every": 2,
                                              "train.batch_size": 2, "train.base_batch_size": 2})
    cfg = load_config("digits", overrides)
    untrained = evaluate(O2F(cfg.model), build_dataset(cfg, "val"), cfg, torch.device("cpu"))

    work = tmp_path / "run"
    assert main(["train", "--config", "digits", "--work-dir", str(work), *sets(overrides)]) == 0
    assert (work / "last.pt").exists() and (work / "config.yaml").exists()
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [2]
    assert set(records[0]) >= {"AP", "AP50", "AR100", "epoch"}
    assert records[0]["AP"] > untrained["AP"]

    metrics_out, results_out = tmp_path / "m.json", tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(work / "last.pt"), "--metrics-out",
                 str(metrics_out), "--results-out", str(results_out)]) == 0
    metrics = json.loads(metrics_out.read_text())
    assert metrics["AP"] == pytest.approx(records[0]["AP"], abs=1e-9)
    results = json.loads(results_out.read_text())
    assert results and {r["category_id"] for r in results} <= {5, 9, 11}

    out = tmp_path / "pred"
    val_dir = rectangles["val"][1]
    assert main(["predict", "--checkpoint", str(work / "last.pt"), str(val_dir),
                 "--out", str(out)]) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert len(detections) == len(list(val_dir.glob("*.png")))
    assert len(list(out.glob("*.png"))) == len(detections)


def test_resume_continues_exactly(rectangles, tmp_path):
    overrides = rect_overrides(rectangles, **{"train.eval_every": 0})
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(["train", "--config", "digits", "--work-dir", str(full), *sets(overrides)]) == 0
    iters_per_epoch = load_checkpoint(full / "last.pt")["state"]["global_iter"] // 2
    first = [*overrides, f"train.max_iters={iters_per_epoch}"]
    assert main(["train", "--config", "digits", "--work-dir", str(split), *sets(first)]) == 0
    assert load_checkpoint(split / "last.pt")["state"]["epoch"] == 1
    assert main(["train", "--config", "digits", "--work-dir", str(split), "--resume",
                 *sets(overrides)]) == 0
    # the second run started where the first stopped: it logged only the second epoch's
    # iterations (log_every=2), and said so
    logged = [json.loads(x)["iter"] for x in (split / "log.jsonl").read_text().splitlines()]
    first_run = list(range(2, iters_per_epoch + 1, 2))
    assert logged == first_run + [i + iters_per_epoch for i in first_run]
    assert "at epoch 1, iteration 0 of the epoch" in (split / "train.log").read_text()
    assert load_checkpoint(split / "last.pt")["state"]["global_iter"] == 2 * iters_per_epoch
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(split / "last.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_channels_last_changes_the_layout_not_the_training(rectangles, tmp_path):
    # SGD: with AdamW, float noise in near-zero gradients becomes full-size steps
    overrides = rect_overrides(rectangles, **{"train.eval_every": 0, "train.max_iters": 2,
                                              "train.optimizer": "sgd", "train.lr": 0.01})
    weights = {}
    for layout in ("true", "false"):
        work = tmp_path / layout
        assert main(["train", "--config", "digits", "--work-dir", str(work),
                     *sets([*overrides, f"train.channels_last={layout}"])]) == 0
        weights[layout] = load_checkpoint(work / "last.pt")["model"]
    conv = "backbone.stages.1.0.0.weight"
    assert weights["true"][conv].is_contiguous(memory_format=torch.channels_last)
    assert not weights["false"][conv].is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)  # train.seed: the weights both runs started from
    model = O2F(load_config("digits", overrides).model)
    initial = {k: v.detach() for k, v in model.named_parameters()}  # buffers aside
    keys = list(initial)
    update = torch.cat([(weights["false"][k] - initial[k]).flatten() for k in keys])
    layout_gap = torch.cat([(weights["true"][k] - weights["false"][k]).flatten() for k in keys])
    # The kernels agree to float rounding (~1e-7), which near-ties in the assignment at
    # initialisation amplify to about 1% of the update; a layout bug would be of its size.
    assert update.norm() > 1e-3
    assert layout_gap.norm() < 0.05 * update.norm()


def test_epoch_batches_are_grouped_deterministic_and_cover_the_data():
    sizes = [(100, 200 + i) for i in range(10)] + [(300 - i, 100) for i in range(5)]
    a = epoch_batches(sizes, 4, seed=1, epoch=0)
    assert a == epoch_batches(sizes, 4, seed=1, epoch=0)
    assert a != epoch_batches(sizes, 4, seed=1, epoch=1)
    assert all(len(b) == 4 for b in a)
    landscape = [w >= h for h, w in sizes]
    assert all(len({landscape[i] for i in b}) == 1 for b in a)  # one orientation per batch
    assert set().union(*a) == set(range(15))
    assert len(a) == 3 + 2  # 10 -> 12 landscape (3 batches), 5 -> 8 portrait (2)
    # within a pool of batches images are sorted by area: batches do not interleave
    pooled = epoch_batches(sizes[:10], 2, seed=3, epoch=0, pool=5)
    spans = sorted((min(sizes[i][1] for i in b), max(sizes[i][1] for i in b)) for b in pooled)
    assert all(hi <= lo2 for (_, hi), (lo2, _) in zip(spans, spans[1:], strict=False))


def test_presets_follow_the_release_recipes():
    r50 = load_config("r50_1x")
    assert (r50.model.backbone, r50.model.num_classes, r50.model.o2f_topk) == ("resnet50", 80, 7)
    assert base_lr(r50) == pytest.approx(0.01) and r50.train.batch_size == 16
    assert (r50.train.epochs, r50.train.steps) == (12, [8, 11])
    assert (r50.data.min_size, r50.data.max_size, r50.data.flip) == ([800, 800], 1333, True)
    assert (r50.model.topk, r50.model.pre_topk, r50.model.score_thresh) == (100, 1000, 0.05)
    assert r50.model.use_nms is False and r50.train.warmup_iters == 1000
    assert (r50.train.momentum, r50.train.weight_decay) == (0.9, 1e-4)
    ms = load_config("r50_3x_ms")
    assert (ms.train.epochs, ms.train.steps, ms.data.min_size) == (36, [24, 33], [640, 800])
    half = load_config("r50_1x", ["train.batch_size=8"])
    assert base_lr(half) == pytest.approx(0.005)  # linear scaling
    # warm-up from 0.001 x lr over 1000 iterations, then x0.1 at epochs 8 and 11
    assert lr_factor(0, r50, 100) == pytest.approx(0.001)
    assert lr_factor(500, r50, 1000) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(7999, r50, 1000) == pytest.approx(1.0)
    assert lr_factor(8000, r50, 1000) == pytest.approx(0.1)
    assert lr_factor(11000, r50, 1000) == pytest.approx(0.01)
    ch = load_config("crowdhuman_r50")
    assert (ch.model.o2f_topk, ch.model.topk, ch.model.pre_topk) == (4, 500, 5000)
    assert (ch.train.optimizer, ch.train.lr, ch.train.epochs, ch.train.steps) == (
        "adamw", 4e-5, 50, [40])
    assert (ch.data.min_size, ch.data.max_size) == ([480, 960], 1400)
    assert (ch.model.min_size, ch.model.max_size) == (800, 1400)
    for name in ("r50_1x", "r50_3x_ms"):
        model = O2F(load_config(name, ["model.backbone_weights=null"]).model)
        assert model.strides == [8, 16, 32, 64, 128]


def test_eval_reports_a_checkpoint_that_does_not_fit(rectangles, tmp_path, capsys):
    overrides = rect_overrides(rectangles, **{"train.max_iters": 2, "train.eval_every": 0})
    work = tmp_path / "run"
    assert main(["train", "--config", "digits", "--work-dir", str(work), *sets(overrides)]) == 0
    other = [*overrides, "model.num_classes=5"]
    assert main(["eval", "--config", "digits", "--checkpoint", str(work / "last.pt"),
                 *sets(other)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "head.cls_out.weight" in err and "(5, 64, 3, 3)" in err
    model, cfg, _ = model_from_checkpoint(work / "last.pt")
    assert cfg.model.num_classes == 3
