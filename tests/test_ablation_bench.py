"""benchmarks/ablation.py: modes trained as separate runs into one --out end in one table."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "ablation_bench", Path(__file__).parents[1] / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_separate_runs_merge_into_one_table(tmp_path):
    args = argparse.Namespace(budget=2.0, classes=1, variant="crowd", set=[])
    path = tmp_path / "results.json"
    path.write_text(json.dumps({
        "budget": 2.0, "classes": 1, "variant": "crowd", "overrides": [],
        "train_seconds": {"o2o": 10.0, "o2f": 11.0},
        "rows": [{"variant": "o2f", "AP": 0.1}, {"variant": "o2o", "AP": 0.2}]}))
    rows, seconds = ablation.merged_with_earlier(
        path, args, [{"variant": "poto", "AP": 0.3}, {"variant": "o2f", "AP": 0.4}],
        {"poto": 12.0, "o2f": 13.0})
    # this run's o2f replaces the earlier one; o2o is kept; the table's order
    assert rows == [{"variant": "o2f", "AP": 0.4}, {"variant": "o2o", "AP": 0.2},
                    {"variant": "poto", "AP": 0.3}]
    assert seconds == {"o2o": 10.0, "o2f": 13.0, "poto": 12.0}
    # another setup (here the budget) is not mixed in
    other = argparse.Namespace(budget=1.0, classes=1, variant="crowd", set=[])
    fresh = [{"variant": "poto", "AP": 0.3}]
    assert ablation.merged_with_earlier(path, other, fresh, {}) == (fresh, {})
    assert ablation.merged_with_earlier(tmp_path / "none.json", args, fresh, {}) == (fresh, {})


def test_peak_and_best_iou_per_object():
    # One object (0, 0, 10, 10) of class 1. Box 0 fits (IoU 1) but scores 0.2 at class 1;
    # box 1 (IoU 0.64) scores 0.9; box 2 (IoU 0.25, under 0.5) scores 0.95 and is not a
    # candidate; box 3 fits too but scores high only at class 0. A second object with no
    # box at IoU >= 0.5 is left out.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 8.0, 8.0],
                          [0.0, 0.0, 5.0, 5.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([[0.0, 0.2], [0.0, 0.9], [0.0, 0.95], [0.99, 0.1]])
    got = ablation.peak_and_best_iou(scores, boxes, gt, torch.tensor([1, 1]))
    assert got == [pytest.approx((0.64, 1.0))]


def test_every_lever_of_the_end_to_end_benchmark_builds_a_model():
    # A lever whose keys no longer exist (or that no longer build) would fail only after a
    # run was launched; every one is checked here, model included.
    from o2f.config import load_config
    from o2f.model.detector import create_model

    spec = importlib.util.spec_from_file_location(
        "end_to_end_bench", Path(__file__).parents[1] / "benchmarks" / "end_to_end.py")
    end_to_end = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(end_to_end)
    assert len(end_to_end.LEVERS) > 40
    for name, (label, overrides) in end_to_end.LEVERS.items():
        cfg = load_config("digits", ["model.num_classes=1", *overrides])
        create_model(cfg.model)
        assert label, name
