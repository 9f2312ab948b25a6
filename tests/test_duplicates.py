"""The duplicate rate of the ablation (o2f.evaluation.duplicates), on hand-made scenes."""

import pytest
import torch
from faster_coco_eval import COCO

from o2f.evaluation import coco_evaluate, duplicate_rate
from o2f.evaluation.duplicates import duplicate_pairs, without_duplicates

GT = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]])
GT_LABELS = torch.tensor([1, 1])


def pairs(boxes, scores, labels=None, **kwargs):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    labels = torch.ones(len(boxes), dtype=torch.int64) if labels is None else torch.tensor(labels)
    return duplicate_pairs(boxes, torch.tensor(scores), labels, GT, GT_LABELS, **kwargs)


def test_second_detection_of_an_object_is_a_duplicate_of_the_best():
    # Detection 1 and 2 both repeat detection 0 (the best on gt 0); 3 is alone on gt 1.
    found = pairs([[0, 0, 10, 10], [1, 0, 10, 10], [0, 1, 10, 11], [20, 0, 30, 10]],
                  [0.9, 0.5, 0.6, 0.8])
    assert sorted(found) == [(1, 0, 0), (2, 0, 0)]


def test_each_object_once_has_no_duplicates():
    assert pairs([[0, 0, 10, 10], [20, 0, 30, 10]], [0.9, 0.8]) == []


def test_low_scores_other_classes_and_misses_do_not_count():
    boxes = [[0, 0, 10, 10], [1, 0, 10, 10], [0, 0, 9, 10]]
    # score below the threshold; another class
    assert pairs(boxes[:2], [0.9, 0.29]) == []
    assert pairs(boxes, [0.9, 0.8, 0.7], labels=[1, 2, 3]) == []
    # IoU 0.67 with the better detection but only 0.43 with the gt: a miss, not a duplicate
    assert pairs([[2, 0, 12, 10], [4, 0, 14, 10]], [0.9, 0.8]) == []
    assert pairs([[2, 0, 12, 10], [3, 0, 13, 10]], [0.9, 0.8]) == [(1, 0, 0)]
    # the threshold is inclusive
    assert pairs(boxes[:2], [0.9, 0.3]) == [(1, 0, 0)]


def test_overlapping_detections_of_two_objects_are_not_duplicates():
    # Two gts at IoU 0.6; one detection on each: both correct, whatever they overlap.
    gt = torch.tensor([[0.0, 0, 10, 10], [2.5, 0, 12.5, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [2.5, 0, 12.5, 10]])
    assert duplicate_pairs(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 1]), gt,
                           torch.tensor([1, 1])) == []


def test_no_ground_truth_or_no_detections():
    empty = torch.zeros(0, 4)
    assert duplicate_pairs(empty, torch.zeros(0), torch.zeros(0, dtype=torch.int64), GT,
                           GT_LABELS) == []
    assert duplicate_pairs(GT, torch.tensor([0.9, 0.9]), GT_LABELS, empty,
                           torch.zeros(0, dtype=torch.int64)) == []


def test_rate_is_per_image_of_the_dataset_and_ignores_crowd_boxes():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 40, "height": 20} for i in (1, 2, 3, 4)],
        "categories": [{"id": 7, "name": "digit"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "area": 100,
             "iscrowd": 1},
        ]}
    coco.createIndex()
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 7, "bbox": [0.5, 0, 10, 10], "score": 0.7},
            {"image_id": 1, "category_id": 7, "bbox": [0, 0.5, 10, 10], "score": 0.4},
            {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.9},
            {"image_id": 2, "category_id": 7, "bbox": [0.5, 0, 10, 10], "score": 0.7}]
    assert duplicate_rate(coco, dets) == 2 / 4  # two in image 1; the crowd box is no object
    assert duplicate_rate(coco, dets, score=0.5) == 1 / 4
    assert duplicate_rate(coco.dataset, dets) == 2 / 4  # the ground truth as a dict


def test_without_duplicates_leaves_out_exactly_the_counted_ones():
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": 40, "height": 20}],
        "categories": [{"id": 7, "name": "digit"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 10, 10],
                         "area": 100, "iscrowd": 0}]}
    coco.createIndex()
    # A (0.9) is the first on the object, at IoU 0.68 with it; B (0.6) repeats it (IoU
    # 0.75 with A) with a better box (0.90 with the object); C (0.2) as B, below the score
    # that counts.
    a = {"image_id": 1, "category_id": 7, "bbox": [1, 1, 10, 10], "score": 0.9}
    b = {"image_id": 1, "category_id": 7, "bbox": [0.5, 0, 10, 10], "score": 0.6}
    c = {"image_id": 1, "category_id": 7, "bbox": [0, 0.5, 10, 10], "score": 0.2}
    assert without_duplicates(coco, [a, b, c]) == [a, c]
    assert without_duplicates(coco, [a, b, c], score=0.1) == [a]
    assert without_duplicates(coco, [a, b, c], score=0.7) == [a, b, c]
    # A duplicate with a better box is a second chance at a strict IoU: AP75 counts B as
    # the match once A misses (precision 1/2); with the duplicates gone, the object is
    # missed at 0.75, and found as well as before at 0.5.
    assert coco_evaluate(coco, [a, b])["AP75"] == pytest.approx(0.5, abs=0.01)
    alone = without_duplicates(coco, [a, b])
    assert coco_evaluate(coco, alone)["AP75"] == 0
    assert coco_evaluate(coco, alone)["AP50"] == coco_evaluate(coco, [a, b])["AP50"] == 1
