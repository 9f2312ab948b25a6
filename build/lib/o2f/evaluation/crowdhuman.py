"""The CrowdHuman benchmark's metrics: AP, MR^-2, recall and JI, by the official protocol.

The numbers are those of the evaluation code released with CrowdHuman and used by CrowdDet
and the O2F authors (AP and MR by ``APMRToolkits``' ``Database.eval_AP`` / ``eval_MR`` with
``Image.compare_caltech``, recall as the O2F release's ``crowdhuman_metric.py``, JI by
``compute_JI.py``), re-implemented with numpy and scipy. The protocol, step by step:

1. Ground truth: every ``fbox`` ``[x, y, w, h]`` of an image's ``gtboxes`` is a *person*
   when its tag is ``"person"`` and ``extra.ignore`` is 0, else an *ignore region* (CrowdHuman
   tags crowds and reflections ``"mask"``). Detections: ``box`` and ``score`` of ``dtboxes``
   (their ``tag`` is not read). All boxes become x1y1x2y2 and are clipped to the image
   *asymmetrically*: x1 to [0, width - 1], y1 to [0, height - 1], x2 to [0, width], y2 to
   [0, height]. The official val file carries no size (the reference takes ``width`` /
   ``height`` from whichever of the two files has them first, in practice the detection
   dump); here: the gt record, else the detection record, else ``image_sizes``, else the
   image headers in ``image_dir``.
2. Overlaps: IoU = inter / (area_a + area_b - inter + 1e-6) and, against ignore regions, the
   intersection over the box's own area, inter / (area + 1e-6). Every threshold is strict:
   an IoU of exactly 0.5 is not a match.
3. AP, MR, recall. In each image the detections, by descending score, are matched greedily:
   a detection takes the still unmatched person of highest IoU if that IoU is > 0.5 (ties:
   the earlier person); otherwise, if it covers an ignore region (own-area overlap > 0.5), it
   is dropped; otherwise it is a false positive. Ignore regions can absorb any number of
   detections, but persons inside them still count (only JI forgives those). The kept
   detections of all images are then sorted by score (ties keep the gt file's image order,
   then the order within the image: the sorts are stable) and accumulated into
   recall = TP / persons and precision = TP / (TP + FP) points.

   - AP is the trapezoidal area under those points. There is no point at recall 0, so the
     area before the first detection is left out: a perfect detector of G persons scores
     (G - 1) / G, not 1 (about 0.99999 with CrowdHuman val's roughly 100,000 persons).
   - MR is the log-average miss rate at the nine FPPI (false positives per image) points
     0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000 (10^-2..10^0
     rounded to 4 decimals, as in the reference). For each point the miss rate is read at
     the first detection whose cumulative FPPI is >= the point (that is, after the false
     positive that reaches it), or at the last detection if FPPI never gets there; no
     interpolation. A single zero miss rate among the nine makes MR 0.
   - recall is the recall at the last detection.
4. JI, per image and per score threshold t in 0.0, 0.1, ..., 0.9 (computed as ``0.1 * i``;
   detections with score > t strictly): k = size of a maximum-weight bipartite matching
   between the detections and the persons, weights = IoU, only pairs with IoU > 0.5. The
   unmatched detections that cover an ignore region (> 0.5 of their own area) and the
   unmatched persons that lie inside one (> 0.5 of the person's area) are removed:
   n = detections - those, m = persons - those, and the image scores k / (m + n - k + 1e-6).
   The mean is the sum over all images divided by the number of images with m or n
   non-zero; JI is the best mean over the ten thresholds.

Where the reference code crashes or returns NaN, this module returns defined numbers:

- an image whose ``gtboxes`` is empty (the reference's AP/MR loader fails on it) has no
  persons and no ignore regions: its detections are false positives;
- an image absent from the detections (the reference fails), or with no detections, simply
  contributes misses; detections of images not in the ground truth are an error;
- with no detection kept at all, or no person in the whole ground truth: AP 0, recall 0 and
  MR 1 (the reference gives AP 0, MR NaN and no recall at all for the first, and a
  ZeroDivisionError for the second); JI 0 at a threshold where every image has m = n = 0
  (the reference divides by zero).

Two deviations, both unreachable with CrowdHuman's own files: a tag ``"background"`` (the
reference gives it class 0, counting it as a person that can never be matched) is an ignore
region here; and the matching for JI is scipy's ``linear_sum_assignment`` on the IoU matrix
instead of a general blossom matcher, which can differ only when two matchings of
different size have exactly the same total IoU.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from o2f.data.crowdhuman import find_images, image_size, is_ignore, iter_odgt

__all__ = ["FPPI_POINTS", "IOU_THRESHOLD", "JI_SCORE_THRESHOLDS", "crowdhuman_evaluate"]

IOU_THRESHOLD = 0.5
# The reference's own rounded values of 10^-2, 10^-1.75, ..., 10^0; FPPI is compared with
# ">=", so the rounding decides which detection a point reads at (e.g. 1 FP in 100 images).
FPPI_POINTS = np.array([0.0100, 0.0178, 0.0316, 0.0562, 0.1000, 0.1778, 0.3162, 0.5623, 1.000])
# 0.1 * i, not i / 10: the reference builds them so and 0.1 * 3 is 0.30000000000000004.
JI_SCORE_THRESHOLDS = tuple(0.1 * i for i in range(10))
_EPS = 1e-6  # the reference's overlap denominators and JI denominator

Records = str | os.PathLike | Sequence[Mapping[str, Any]]


@dataclass
class _Image:
    """One image, boxes x1y1x2y2 in pixels (clipped once the size is known)."""

    id: str
    where: str  # "file:line" of its ground-truth record, for errors
    gt: np.ndarray  # (G, 4)
    person: np.ndarray  # (G,) bool: a person (else an ignore region)
    dt: np.ndarray  # (D, 4)
    scores: np.ndarray  # (D,)
    size: tuple[int, int] | None  # (height, width)


# --------------------------------------------------------------------------------------------
# loading


def _numbered(records: Records, what: str) -> tuple[str, list[tuple[str, dict]]]:
    """(name, [(where, record)]) from an odgt path or an in-memory list of records."""
    if isinstance(records, (str, os.PathLike)):
        name = os.fspath(records)
        return name, [(f"{name}:{n}", rec) for n, rec in iter_odgt(records)]
    name = f"<{what} records>"
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "ID" not in rec:
            raise ValueError(f"{name}[{i}]: expected a dict with an 'ID' key")
        out.append((f"{name}[{i}]", rec))
    return name, out


def _xyxy(rows: list, where: str, key: str) -> np.ndarray:
    try:
        boxes = np.array(rows, dtype=np.float64).reshape(len(rows), 4)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: every '{key}' must be 4 numbers [x, y, w, h]") from None
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _record_size(rec: Mapping[str, Any]) -> tuple[int, int] | None:
    if rec.get("height") is None or rec.get("width") is None:
        return None
    return int(rec["height"]), int(rec["width"])


def _load_gt(gt_odgt: Records) -> tuple[str, list[_Image]]:
    name, numbered = _numbered(gt_odgt, "gt")
    images, seen = [], {}
    for where, rec in numbered:
        key = str(rec["ID"])
        if key in seen:
            raise ValueError(f"{where}: image {key!r} repeats the record at {seen[key]}")
        seen[key] = where
        boxes = rec.get("gtboxes")
        if not isinstance(boxes, list):
            raise ValueError(f"{where}: image {key!r} has no 'gtboxes' list")
        try:
            fboxes = [b["fbox"] for b in boxes]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: a gtbox of image {key!r} has no 'fbox'") from None
        images.append(_Image(
            id=key, where=where, gt=_xyxy(fboxes, where, "fbox"),
            person=np.array([not is_ignore(b) for b in boxes], dtype=bool),
            dt=np.zeros((0, 4)), scores=np.zeros(0), size=_record_size(rec),
        ))
    return name, images


def _load_dt(dt_odgt: Records, images: list[_Image], gt_name: str) -> None:
    """Put each record's detections into its image (and its size, when the image has none)."""
    index = {img.id: img for img in images}
    _, numbered = _numbered(dt_odgt, "dt")
    seen: dict[str, str] = {}
    for where, rec in numbered:
        key = str(rec["ID"])
        img = index.get(key)
        if img is None:
            raise ValueError(f"{where}: image {key!r} is not in the ground truth {gt_name}")
        if key in seen:
            raise ValueError(f"{where}: image {key!r} repeats the record at {seen[key]}")
        seen[key] = where
        boxes = rec.get("dtboxes")
        if not isinstance(boxes, list):
            raise ValueError(f"{where}: image {key!r} has no 'dtboxes' list")
        try:
            img.dt = _xyxy([b["box"] for b in boxes], where, "box")
            img.scores = np.array([b["score"] for b in boxes], dtype=np.float64).reshape(-1)
        except (KeyError, TypeError):
            raise ValueError(f"{where}: every dtbox needs 'box' and 'score'") from None
        if img.size is None:
            img.size = _record_size(rec)


def _fill_sizes(
    images: list[_Image],
    gt_odgt: Records,
    image_sizes: Mapping[str, tuple[int, int]] | None,
    image_dir: str | os.PathLike | None,
) -> None:
    """Sizes of the images whose records have none: ``image_sizes``, then the cache next to
    the gt file, then the image headers in ``image_dir`` (which refresh the cache)."""
    missing = [img for img in images if img.size is None]
    if missing and image_sizes is not None:
        for img in missing:
            if img.id in image_sizes:
                h, w = image_sizes[img.id]
                img.size = int(h), int(w)
        missing = [img for img in missing if img.size is None]
    if not missing:
        return
    cache_path = (Path(os.fspath(gt_odgt) + ".sizes.json")
                  if isinstance(gt_odgt, (str, os.PathLike)) else None)
    cache: dict[str, list[int]] = {}
    if cache_path is not None and cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
            if not isinstance(cache, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            warnings.warn(f"{cache_path}: unreadable size cache, ignored ({e})", stacklevel=3)
            cache = {}
    for img in missing:
        if img.id in cache:
            img.size = tuple(cache[img.id])
    missing = [img for img in missing if img.size is None]
    if missing and image_dir is not None and Path(image_dir).is_dir():
        files = find_images(image_dir)
        for img in missing:
            if img.id in files:
                img.size = image_size(Path(image_dir) / files[img.id])
                cache[img.id] = list(img.size)
        if cache_path is not None:
            _write_cache(cache_path, cache)
        missing = [img for img in missing if img.size is None]
    if missing:
        img = missing[0]
        raise ValueError(
            f"{img.where}: no size for image {img.id!r} ({len(missing)} of {len(images)} images "
            f"lack one): the boxes must be clipped to the image, so give the records "
            f"'width'/'height', or pass image_sizes={{ID: (height, width)}} or image_dir= "
            f"(the folder of '{img.id}.jpg')"
            + (f"; {image_dir} has no image of that name" if image_dir is not None else "")
        )


def _write_cache(path: Path, cache: dict[str, list[int]]) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(cache), encoding="utf-8")
        os.replace(tmp, path)  # concurrent evaluations never read a half-written cache
    except OSError as e:
        warnings.warn(f"{path}: could not write the image size cache ({e})", stacklevel=4)


# --------------------------------------------------------------------------------------------
# geometry


def _clip(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) x1y1x2y2 clipped as the reference does: x1, y1 into [0, size - 1] but x2, y2
    into [0, size] (a box lying right of the image keeps a one-pixel sliver)."""
    out = np.empty_like(boxes)
    out[:, 0] = np.minimum(np.maximum(boxes[:, 0], 0), width - 1)
    out[:, 1] = np.minimum(np.maximum(boxes[:, 1], 0), height - 1)
    out[:, 2] = np.maximum(np.minimum(boxes[:, 2], width), 0)
    out[:, 3] = np.maximum(np.minimum(boxes[:, 3], height), 0)
    return out


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) intersection areas of (N, 4) and (M, 4) x1y1x2y2 boxes."""
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.maximum(iw, 0) * np.maximum(ih, 0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU with the reference's + 1e-6 in the denominator (areas not clamped, so an
    inverted box gives a meaningless value; its intersection is 0, so never a match)."""
    inter = _intersection(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a[:, None] + area_b[None, :] - inter + _EPS)


def _covered(a: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """(N,) bool: box i has more than half of its own area inside one of ``regions``."""
    if len(regions) == 0 or len(a) == 0:
        return np.zeros(len(a), dtype=bool)
    area = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    ioa = _intersection(a, regions) / (area[:, None] + _EPS)
    return (ioa > IOU_THRESHOLD).any(axis=1)


# --------------------------------------------------------------------------------------------
# matching within one image


def _greedy_match(iou: np.ndarray) -> np.ndarray:
    """Score-ordered greedy matching of the AP/MR protocol.

    Args:
        iou: (D, P) IoU of the detections, sorted by descending score, with the persons.

    Returns:
        (D,) int64: the matched person of each detection, or -1.
    """
    match = np.full(iou.shape[0], -1, dtype=np.int64)
    cand = iou > IOU_THRESHOLD
    rows = np.flatnonzero(cand.any(axis=1))
    if rows.size == 0:
        return match
    cand = cand[rows]
    cols = np.flatnonzero(cand.any(axis=0))
    cand = cand[:, cols]
    sub = np.where(cand, iou[rows][:, cols], -np.inf)
    if (cand.sum(axis=0) == 1).all():
        # no person is wanted by two detections: every detection gets its best person
        match[rows] = cols[sub.argmax(axis=1)]
        return match
    # Sequential by nature (a detection's choice removes a person for the lower-scored
    # ones), but only over the detections that have a candidate at all.
    for r in range(rows.size):
        c = int(sub[r].argmax())  # first maximum = the reference's strict ">" scan
        if sub[r, c] == -np.inf:
            continue  # all its candidates are taken
        match[rows[r]] = cols[c]
        sub[r + 1:, c] = -np.inf
    return match


def _ji_counts(
    iou: np.ndarray, n_kept: list[int], dt_covered: np.ndarray, gt_covered: np.ndarray
) -> np.ndarray:
    """(T, 3) int64 [k, m, n] of one image at each score threshold.

    Args:
        iou: (D, P) IoU of detections (sorted by descending score) with persons.
        n_kept: for each threshold, how many leading detections score above it.
        dt_covered: (D,) detections inside an ignore region.
        gt_covered: (P,) persons inside an ignore region.
    """
    out = np.zeros((len(n_kept), 3), dtype=np.int64)
    edges = iou > IOU_THRESHOLD
    weights = np.where(edges, iou, 0.0)  # 0 = no edge (every real edge weighs > 0.5)
    has_edge = edges.any(axis=1)
    num_persons = iou.shape[1]
    ignored_gt_all = int(gt_covered.sum())
    done: dict[int, tuple[int, int, int]] = {}
    for t, n in enumerate(n_kept):
        if n not in done:
            rows = np.flatnonzero(has_edge[:n])
            dt_m = gt_m = rows[:0]
            if rows.size:
                w = weights[rows]
                cols = np.flatnonzero(w.any(axis=0))
                w = w[:, cols]
                r, c = linear_sum_assignment(w, maximize=True)
                ok = w[r, c] > 0  # rectangular problems also pair rows with non-edges
                dt_m, gt_m = rows[r[ok]], cols[c[ok]]
            ignored_dt = int(dt_covered[:n].sum()) - int(dt_covered[dt_m].sum())
            ignored_gt = ignored_gt_all - int(gt_covered[gt_m].sum())
            done[n] = (dt_m.size, num_persons - ignored_gt, n - ignored_dt)
        out[t] = done[n]
    return out


def _evaluate_image(img: _Image) -> tuple[np.ndarray, np.ndarray]:
    """Returns (flags (D,) int8 in the image's detection order: 1 true positive, 0 false
    positive, -1 ignored; JI counts (T, 3) [k, m, n])."""
    h, w = img.size
    gt = _clip(img.gt, h, w)
    dt = _clip(img.dt, h, w)
    persons, regions = gt[img.person], gt[~img.person]
    order = np.argsort(-img.scores, kind="stable")  # stable: ties keep the file order
    dt_sorted = dt[order]
    iou = _iou(dt_sorted, persons)
    dt_covered = _covered(dt_sorted, regions)

    match = _greedy_match(iou)
    flags_sorted = np.where(match >= 0, 1, np.where(dt_covered, -1, 0)).astype(np.int8)
    flags = np.empty_like(flags_sorted)
    flags[order] = flags_sorted

    scores = img.scores[order]
    n_kept = [int(np.count_nonzero(scores > t)) for t in JI_SCORE_THRESHOLDS]
    ji = _ji_counts(iou, n_kept, dt_covered, _covered(persons, regions))
    return flags, ji


# --------------------------------------------------------------------------------------------
# the metrics


def _ap_mr_recall(
    scores: np.ndarray, flags: np.ndarray, num_persons: int, num_images: int
) -> tuple[float, float, float]:
    """AP, MR and recall from all images' detections (concatenated in gt-file order, then
    the order within each image) and their flags."""
    order = np.argsort(-scores, kind="stable")
    f = flags[order]
    f = f[f >= 0]
    if f.size == 0 or num_persons == 0:
        return 0.0, 1.0, 0.0
    tp = np.cumsum(f == 1).astype(np.float64)
    fp = np.cumsum(f == 0).astype(np.float64)
    recall = tp / num_persons
    precision = tp / (tp + fp)
    # np.cumsum adds left to right like the reference's loop, so AP matches to the last bit
    ap = float(np.cumsum(np.diff(recall) * ((precision[:-1] + precision[1:]) / 2))[-1]
               if f.size > 1 else 0.0)
    miss = 1.0 - recall
    fppi = fp / num_images
    at = np.minimum(np.searchsorted(fppi, FPPI_POINTS, side="left"), f.size - 1)
    with np.errstate(divide="ignore"):  # a zero miss rate: log 0 = -inf, exp(-inf) = 0
        mr = float(np.exp(np.log(miss[at]).mean()))
    return ap, mr, float(recall[-1])


def _ji(counts: np.ndarray) -> float:
    """Best mean JI over the thresholds from (I, T, 3) counts [k, m, n]."""
    k, m, n = counts[..., 0], counts[..., 1], counts[..., 2]
    ratio = k / (m + n - k + _EPS)
    scored = ((m != 0) | (n != 0)).sum(axis=0)
    # summed along contiguous rows: numpy's pairwise sum then adds in the reference's order
    sums = np.ascontiguousarray(ratio.T).sum(axis=1)
    means = np.where(scored > 0, sums / np.maximum(scored, 1), 0.0)
    return float(means.max())


def crowdhuman_evaluate(
    gt_odgt: Records,
    dt_odgt: Records,
    *,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    image_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """Evaluate CrowdHuman detections by the benchmark's protocol (see the module docstring).

    Args:
        gt_odgt: ground truth, an ``.odgt`` path or its records: ``{"ID", "gtboxes": [{"fbox":
            [x, y, w, h], "tag": "person" | "mask", "extra": {"ignore": 0 | 1}}]}``, optionally
            with ``"width"``/``"height"``. Its images (and their order) define the set.
        dt_odgt: detections, a path or records ``{"ID", "dtboxes": [{"box": [x, y, w, h],
            "score": s, "tag": 1}]}`` in pixels of the original image, optionally with
            ``"width"``/``"height"``; images without a record have no detections.
        image_sizes: ``{ID: (height, width)}`` for records without ``width``/``height``.
        image_dir: folder of ``{ID}.jpg`` for the remaining sizes, read from the headers
            once and cached in ``<gt_odgt>.sizes.json`` (when ``gt_odgt`` is a path).

    Returns:
        ``{"AP", "MR", "recall", "JI"}`` as floats on the 0-1 scale (MR: lower is better).

    Raises:
        ValueError: naming the file and line (or list index) of a malformed record, of a
            detection record for an unknown or repeated image, or of the first image whose
            size cannot be found.
    """
    gt_name, images = _load_gt(gt_odgt)
    _load_dt(dt_odgt, images, gt_name)
    _fill_sizes(images, gt_odgt, image_sizes, image_dir)

    flags, counts = [], np.zeros((len(images), len(JI_SCORE_THRESHOLDS), 3), dtype=np.int64)
    for i, img in enumerate(images):
        f, counts[i] = _evaluate_image(img)
        flags.append(f)
    scores = np.concatenate([img.scores for img in images]) if images else np.zeros(0)
    flags_all = np.concatenate(flags) if flags else np.zeros(0, dtype=np.int8)
    num_persons = int(sum(int(img.person.sum()) for img in images))
    ap, mr, recall = _ap_mr_recall(scores, flags_all, num_persons, max(len(images), 1))
    return {"AP": ap, "MR": mr, "recall": recall, "JI": _ji(counts) if images else 0.0}
