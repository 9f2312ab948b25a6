"""Tiled prediction of images larger than the network's input, merged without NMS.

The image is cut into a grid of ``tile`` x ``tile`` windows that overlap by at least
``overlap`` pixels; the windows run through the detector in batches; each detection is
kept only from the tile that *owns* its box centre, and nothing else is done: no NMS, no
box merging, no score threshold beyond the model's own.

Ownership. Along each axis the tile starts are spread evenly, so the grid of tile centres
is a product of two 1-D grids, and the region nearest a tile's centre is a rectangle whose
sides lie halfway between neighbouring centres (the outermost tiles own everything up to,
and beyond, the image border). These rectangles cover the plane exactly once, so every
box centre has exactly one owner (:meth:`TileGrid.owner`).

Why no object is lost or doubled. Two neighbouring tiles overlap by ``o`` >= ``overlap``
pixels and the boundary of their owned regions lies in the middle of the overlap, ``o / 2``
from either tile's edge. An object no larger than ``o`` whose centre a tile owns therefore
lies whole inside that tile, which sees it as a one-pass detector would. The neighbour
that sees the same object cut by its edge sees only the part that lies within ``o`` of its
edge, so the box of that part has its centre within ``o / 2`` of the edge: in the margin the
neighbour does not own, and the cut copy is dropped. Objects larger than the overlap can
be cut in their owner tile too; pick ``overlap`` at least the largest object's side.

Default overlap (:func:`default_overlap`): a quarter of the tile side, rounded up to a
multiple of 8 pixels; so a 512-pixel tile keeps objects up to 128 pixels whole. Give
``overlap`` explicitly when the objects are larger.

Tiles go to the model at the tile's own size; a model that resizes its input
(``model.min_size`` > 0) resizes every tile, so choose ``tile`` near the image size the model
was trained at. A full-image pass at low resolution for objects larger than a tile is left
out: such objects break the premise of tiling (use a larger tile, or predict in one pass).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

__all__ = ["TileGrid", "TiledDetector", "default_overlap", "merge_tiles", "predict_tiled",
           "tile_grid", "tile_starts"]

Detector = Callable[[list[Tensor]], list[dict[str, Tensor]]]


def default_overlap(tile: int) -> int:
    """The overlap used when none is given: ``tile / 4`` rounded up to a multiple of 8
    pixels (512 -> 128, 640 -> 160, 1024 -> 256)."""
    return 8 * math.ceil(tile / 32)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets (pixels) of the tiles along one axis of ``length`` pixels: the fewest
    tiles of side ``tile`` whose neighbours overlap by at least ``overlap``, spread evenly so
    the first starts at 0 and the last ends at ``length``. One tile when ``length <= tile``."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"need tile > 0 and 0 <= overlap < tile, got tile={tile}, "
                         f"overlap={overlap}")
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(i * (length - tile)) // (n - 1) for i in range(n)]


def _midpoints(starts: Sequence[int], side: int) -> Tensor:
    """(n - 1,) float64: halfway between neighbouring tile centres along one axis."""
    return torch.tensor([(a + b + side) / 2 for a, b in zip(starts[:-1], starts[1:],
                                                           strict=True)], dtype=torch.float64)


@dataclass(frozen=True)
class TileGrid:
    """A grid of tiles over an image of ``height`` x ``width`` pixels.

    ``xs``/``ys`` are the tile starts along x and y; tile ``k`` is column ``k % len(xs)``,
    row ``k // len(xs)``. ``x_cuts``/``y_cuts`` (len(xs) - 1, len(ys) - 1) are the owned
    regions' boundaries, halfway between neighbouring tile centres."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    @property
    def x_cuts(self) -> Tensor:
        return _midpoints(self.xs, self.tile_w)

    @property
    def y_cuts(self) -> Tensor:
        return _midpoints(self.ys, self.tile_h)

    @property
    def windows(self) -> Tensor:
        """(T, 4) int64: each tile's window x1, y1, x2, y2 in image pixels (x2, y2 exclusive)."""
        return torch.tensor([[x, y, x + self.tile_w, y + self.tile_h]
                             for y in self.ys for x in self.xs], dtype=torch.int64)

    @property
    def owned(self) -> Tensor:
        """(T, 4) float64: each tile's owned region x1, y1, x2, y2 (half-open: x1 <= x < x2),
        with -inf / inf on the sides that face the image border."""
        inf = torch.tensor([math.inf], dtype=torch.float64)
        xb = torch.cat([-inf, self.x_cuts, inf])
        yb = torch.cat([-inf, self.y_cuts, inf])
        return torch.tensor([[xb[i], yb[j], xb[i + 1], yb[j + 1]]
                             for j in range(len(self.ys)) for i in range(len(self.xs))],
                            dtype=torch.float64)

    def owner(self, points: Tensor) -> Tensor:
        """(N,) int64: the tile that owns each of the (N, 2) points (x, y in image pixels)."""
        p = points.detach().to("cpu", torch.float64).reshape(-1, 2)
        col = torch.bucketize(p[:, 0].contiguous(), self.x_cuts, right=True)
        row = torch.bucketize(p[:, 1].contiguous(), self.y_cuts, right=True)
        return row * len(self.xs) + col

    def crop(self, image: Tensor, k: int) -> Tensor:
        """Tile ``k`` of a C x H x W image: C x tile_h x tile_w (a view)."""
        x, y = self.xs[k % len(self.xs)], self.ys[k // len(self.xs)]
        return image[:, y:y + self.tile_h, x:x + self.tile_w]


def tile_grid(height: int, width: int, tile: int, overlap: int | None = None) -> TileGrid:
    """The tiles of an image of ``height`` x ``width`` pixels: squares of side ``tile``
    (shorter along an axis the image is shorter than ``tile``) overlapping by at least
    ``overlap`` pixels (default :func:`default_overlap`)."""
    overlap = default_overlap(tile) if overlap is None else overlap
    return TileGrid(height, width, min(tile, height), min(tile, width),
                    tuple(tile_starts(width, tile, overlap)),
                    tuple(tile_starts(height, tile, overlap)))


def merge_tiles(grid: TileGrid, detections: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One image's detections from its tiles' detections, by centre ownership.

    ``detections[k]`` is tile ``k``'s ``{"boxes": (N_k, 4) x1y1x2y2 in the tile's pixels,
    "scores": (N_k,), "labels": (N_k,)}``. Returns the same keys for the image: boxes
    shifted to image pixels, only those whose centre tile ``k`` owns, sorted by score."""
    if len(detections) != len(grid):
        raise ValueError(f"{len(detections)} tile detections for a grid of {len(grid)} tiles")
    shifts = grid.windows[:, :2].repeat(1, 2)
    boxes, scores, labels = [], [], []
    for k, det in enumerate(detections):
        b = det["boxes"] + shifts[k].to(det["boxes"])
        keep = grid.owner((b[:, :2] + b[:, 2:]) / 2) == k
        keep = keep.to(b.device)
        boxes.append(b[keep])
        scores.append(det["scores"][keep])
        labels.append(det["labels"][keep])
    scores_all = torch.cat(scores)
    order = scores_all.argsort(descending=True, stable=True)
    return {"boxes": torch.cat(boxes)[order], "scores": scores_all[order],
            "labels": torch.cat(labels)[order]}


def predict_tiled(model: Detector, image: Tensor, *, tile: int, overlap: int | None = None,
                  batch_size: int = 8, progress: bool | None = None) -> dict[str, Tensor]:
    """Detections of one large image from its tiles, merged without NMS.

    Args:
        model: an eval-mode detector (an :class:`o2f.O2F`, or any callable taking a list of
            3 x h x w float images and returning a list of ``boxes``/``scores``/``labels``).
        image: 3 x H x W float RGB in [0, 1] (any size; one tile when it fits in one).
        tile: tile side in pixels.
        overlap: least overlap of neighbouring tiles in pixels (default
            :func:`default_overlap`); objects up to this side are seen whole.
        batch_size: tiles per forward pass.
        progress: show a progress bar (default: when the image has more than 16 tiles).

    Returns:
        ``{"boxes": (N, 4) x1y1x2y2 image pixels, "scores": (N,), "labels": (N,)}``, sorted
        by score.
    """
    if image.dim() != 3:
        raise ValueError(f"predict_tiled takes one 3 x H x W image, got shape "
                         f"{tuple(image.shape)}")
    grid = tile_grid(image.shape[-2], image.shape[-1], tile, overlap)
    progress = len(grid) > 16 if progress is None else progress
    detections: list[dict[str, Tensor]] = []
    with torch.inference_mode(), tqdm(total=len(grid), desc="tiles", unit="tile",
                                      disable=not progress, leave=False,
                                      dynamic_ncols=True) as bar:
        for start in range(0, len(grid), batch_size):
            batch = [grid.crop(image, k) for k in range(start, min(start + batch_size,
                                                                    len(grid)))]
            for det in model(batch):
                if "masks" in det:
                    raise ValueError("tiled prediction merges boxes only; an instance "
                                     "(mask) model is not supported")
                detections.append(det)
            bar.update(len(batch))
    return merge_tiles(grid, detections)


class TiledDetector(nn.Module):
    """A detector that predicts every image tile by tile (:func:`predict_tiled`): the same
    call and result as the model it wraps, for ``evaluate`` and ``o2f eval --tile``."""

    def __init__(self, model: nn.Module, tile: int, overlap: int | None = None,
                 batch_size: int = 8) -> None:
        super().__init__()
        self.model, self.tile, self.overlap, self.batch_size = model, tile, overlap, batch_size

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return [predict_tiled(self.model, img, tile=self.tile, overlap=self.overlap,
                              batch_size=self.batch_size) for img in images]
