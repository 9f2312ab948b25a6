"""benchmarks/ablation.py: modes trained as separate runs into one --out end in one table."""

import argparse
import importlib.util
import json
from pathlib import Path

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
