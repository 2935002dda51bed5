"""Geometry of image-to-image serving, in NumPy: padding to a size multiple, and cutting an image
into fixed-size overlapping tiles whose outputs are blended back without seams.

Fixed-size tiles are what let upscale requests of any size share batches: every tile of every
request has the same shape, so the batcher can put tiles of different requests in one forward
pass. Blending uses linear ramps across each overlap (weights of the two tiles sum to 1 there), so
a tile's border pixels — where zero padding inside the network distorts its output — count for
little or nothing. Image borders are left as they are (a forward pass over the whole image has
them too), so a 256 px image costs 9 tiles of 96 px rather than 16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


MIN_SIDE = 16  # smaller inputs are mirror-padded up to it: the networks' own reflection pads need room


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The size an input is mirror-padded to: multiples of `multiple`, at least MIN_SIDE."""
    floor = -(-max(multiple, MIN_SIDE) // multiple) * multiple
    return max(floor, -(-height // multiple) * multiple), max(floor, -(-width // multiple) * multiple)


def resized_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """`fit=resize`: the nearest multiples of `multiple`, at least the padded floor."""
    floor = -(-max(multiple, MIN_SIDE) // multiple) * multiple
    return max(floor, round(height / multiple) * multiple), max(floor, round(width / multiple) * multiple)


def pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] mirror-padded at the bottom/right to [C, height, width] (any amount, even past
    the image's own size: numpy repeats the reflection)."""
    _, h, w = image.shape
    if (h, w) == (height, width):
        return image
    return np.pad(image, ((0, 0), (0, height - h), (0, width - w)), mode="symmetric")


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image sit, in input pixels of the padded image."""

    height: int  # the original image
    width: int
    tile: int
    overlap: int
    rows: int
    cols: int

    @property
    def step(self) -> int:
        return self.tile - self.overlap

    @property
    def padded_height(self) -> int:
        return (self.rows - 1) * self.step + self.tile

    @property
    def padded_width(self) -> int:
        return (self.cols - 1) * self.step + self.tile

    def origins(self) -> list[tuple[int, int]]:
        return [(r * self.step, c * self.step) for r in range(self.rows) for c in range(self.cols)]


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    if not 0 <= 2 * overlap < tile:
        raise ValueError(f"overlap {overlap} must be below half the tile size {tile}")
    step = tile - overlap

    def count(size: int) -> int:
        return max(1, math.ceil((size - tile) / step) + 1)

    return TileGrid(height, width, tile, overlap, count(height), count(width))


def cut_tiles(image: np.ndarray, grid: TileGrid) -> list[np.ndarray]:
    """[C, H, W] → tiles [C, tile, tile]; the image is mirror-padded at the bottom/right to the
    grid's extent (that padding is cropped off again after blending)."""
    padded = np.pad(image, ((0, 0), (0, grid.padded_height - grid.height), (0, grid.padded_width - grid.width)), mode="symmetric")
    return [padded[:, y : y + grid.tile, x : x + grid.tile] for y, x in grid.origins()]


def ramp(length: int, overlap: int, rise: bool = True, fall: bool = True) -> np.ndarray:
    """1-D blending weight of one tile along one axis, on the sides where it has a neighbour
    (`rise`: one before it, `fall`: one after it). The outer quarter of the overlap gets weight 0
    (a tile's outermost pixels are the ones zero padding inside the network distorts most), the
    middle half changes linearly, the rest is 1; two neighbours' weights sum to exactly 1 across
    their shared overlap. An image border is no seam: there the weight stays 1, as in one
    forward pass over the whole image."""
    weight = np.ones(length, dtype=np.float64)
    if overlap == 0:
        return weight
    margin = overlap // 4
    i = np.arange(length, dtype=np.float64) + 0.5
    if rise:
        weight = np.minimum(weight, (i - margin) / (overlap - 2 * margin))
    if fall:
        weight = np.minimum(weight, (length - i - margin) / (overlap - 2 * margin))
    return np.clip(weight, 0.0, 1.0)


class TileBlender:
    """Tile outputs [C, tile·scale, tile·scale] blended into the image [C, H·scale, W·scale] one
    at a time, as they come back from the batcher, so a request holds its canvas and a batch's
    worth of tiles rather than every tile's output.

    The windows form a partition of unity (neighbouring ramps sum to 1, and a side without a
    neighbour keeps weight 1), so the weighted sum needs no normalisation pass; float32
    throughout keeps a 1024 px frame's blend to a few milliseconds.

    Tiles are NumPy arrays or torch tensors: the canvas is made like the first tile, where it is
    (a runtime that hands back device tensors has its tiles blended on the device, and only the
    finished image's uint8 crosses to the host: service/upscaling.py)."""

    def __init__(self, grid: TileGrid, scale: int, channels: int) -> None:
        self.grid, self.scale, self.channels = grid, scale, channels
        self.size, overlap = grid.tile * scale, grid.overlap * scale
        self.canvas = None  # made like the first tile
        self.ramps = {(rise, fall): ramp(self.size, overlap, rise, fall).astype(np.float32) for rise in (False, True) for fall in (False, True)}
        self.origins = grid.origins()

    def start(self, like) -> None:
        shape = (self.channels, self.grid.padded_height * self.scale, self.grid.padded_width * self.scale)
        if isinstance(like, np.ndarray):
            self.canvas = np.zeros(shape, dtype=np.float32)
            return
        import torch

        self.canvas = torch.zeros(shape, dtype=torch.float32, device=like.device)
        self.ramps = {key: torch.from_numpy(weights).to(like.device) for key, weights in self.ramps.items()}

    def add(self, index: int, output) -> None:
        if self.canvas is None:
            self.start(output)
        grid, size = self.grid, self.size
        row, col = divmod(index, grid.cols)
        window = self.ramps[(row > 0, row < grid.rows - 1)][:, None] * self.ramps[(col > 0, col < grid.cols - 1)][None, :]
        y, x = self.origins[index]
        ys, xs = y * self.scale, x * self.scale
        self.canvas[:, ys : ys + size, xs : xs + size] += output * window

    def result(self):
        return self.canvas[:, : self.grid.height * self.scale, : self.grid.width * self.scale]


class TilePlacer:
    """`TileBlender` for tiles that meet without overlap, already uint8 [tile·scale, tile·scale, C]:
    each is copied into its place (the blend's windows would all be 1), so the image is built from
    the converted pixels — a quarter of the float canvas's bytes, and no float pass over it."""

    def __init__(self, grid: TileGrid, scale: int, channels: int) -> None:
        if grid.overlap:
            raise ValueError("tiles that overlap are blended (TileBlender), not placed")
        self.grid, self.scale, self.size = grid, scale, grid.tile * scale
        self.canvas = np.empty((grid.padded_height * scale, grid.padded_width * scale, channels), dtype=np.uint8)
        self.origins = grid.origins()

    def add(self, index: int, output: np.ndarray) -> None:
        y, x = self.origins[index]
        ys, xs = y * self.scale, x * self.scale
        self.canvas[ys : ys + self.size, xs : xs + self.size] = output

    def result(self) -> np.ndarray:
        return self.canvas[: self.grid.height * self.scale, : self.grid.width * self.scale]


def blend_tiles(outputs: list[np.ndarray], grid: TileGrid, scale: int) -> np.ndarray:
    """All tile outputs at once → the image (see TileBlender)."""
    blender = TileBlender(grid, scale, outputs[0].shape[0])
    for index, output in enumerate(outputs):
        blender.add(index, output)
    return blender.result()
