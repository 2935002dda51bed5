"""One upscale, from uploaded bytes to the float image, the same way for the HTTP route and for
a stream's frame: size checked against the model's limits before decoding, the image cut into
fixed-size tiles (every tile one batcher item, so tiles of different requests and streams share
batches), each tile's output blended into the canvas as it comes back."""
from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from service.admission import RequestCost, upscale_bytes_per_pixel
from service.batcher import RequestState, each_result, wait_items
from service.errors import ApiError
from service.imaging import DECODE_BYTES_PER_PIXEL, tensor_to_uint8, to_uint8
from service.pipeline import estimate
from service.registry import LoadedModel, ModelRegistry
from service.tiling import TileBlender, TileGrid, TilePlacer, cut_tiles, plan_tiles
from service.uploads import prepare


def over_limit(model: LoadedModel, width: int, height: int, pixels: int) -> None:
    """413 for an image-to-image input past the model's measured limit."""
    limit = model.limits.max_input_pixels if model.limits else None
    if limit is not None and pixels > limit:
        raise ApiError(413, f"image of {width}x{height} pixels is over the limit of model {model.entry.name!r}, {limit} pixels "
                            f"(about {int(limit ** 0.5)}² on this machine: its measured cost, the deadline and the memory budget set it)")


@dataclass(frozen=True)
class UpscalePlan:
    grid: TileGrid
    cost: RequestCost

    @property
    def tiles(self) -> int:
        return self.grid.rows * self.grid.cols


def plan_upscale(model: LoadedModel, width: int, height: int) -> UpscalePlan:
    """The tiles and the cost of upscaling a width x height image; 413 past the model's limits."""
    over_limit(model, width, height, width * height)
    grid = plan_tiles(height, width, model.config.upscale_tile, model.config.upscale_overlap)
    tiles = grid.rows * grid.cols
    max_tiles = model.limits.max_tiles if model.limits else None
    if max_tiles is not None and tiles > max_tiles:
        raise ApiError(413, f"an image of {width}x{height} pixels takes {tiles} tiles; {model.entry.name!r} takes at most {max_tiles} per image on this machine")
    spec = model.entry.spec
    resident = height * width * (DECODE_BYTES_PER_PIXEL + upscale_bytes_per_pixel(max(spec["in_channels"], spec["channels"]), spec["scale"]))
    return UpscalePlan(grid, estimate(model, "model", [1.0] * tiles, resident, tiles=True))


async def upscale_upload(registry: ModelRegistry, model: LoadedModel, data: bytes, plan: UpscalePlan, state: RequestState) -> np.ndarray:
    """The admitted work of one upscale: decode, cut into tiles, the tiles through the batcher,
    and the image assembled where they were computed (`assemble_tiles`). In a `--workers` front
    the engine assembles it (`RemoteBatcher.submit_tiles`) and only the image's uint8 crosses
    the link, not every tile's floats."""
    spec = model.entry.spec
    x = await prepare(registry, data, spec["in_channels"])
    tiles = [{"image": tile} for tile in cut_tiles(x, plan.grid)]
    del x
    batcher = registry.batcher(model, "upscale")
    if batcher.assembles_tiles:
        (image,) = await wait_items([batcher.submit_tiles(tiles, state, plan.grid)], state)
        return image
    return await assemble_tiles(model, batcher.submit(tiles, state), state, plan.grid, registry.encoders)


async def assemble_tiles(model: LoadedModel, futures: list[asyncio.Future], state: RequestState, grid: TileGrid,
                         pool: Executor) -> np.ndarray:
    """A request's tile outputs, as they come back, → its image: float [C, H·s, W·s]; or, where
    tiles meet without overlap (`LoadedModel.tiles_as_pixels`), each tile comes back as uint8 and
    is placed → uint8 [H·s, W·s, C] (`imaging.to_uint8` takes either); or, where the runtime
    keeps its tiles (`LoadedModel.keeps_tiles`: the torch runtimes, ONNX Runtime on CUDA), they
    are blended where they were computed and converted there → uint8.

    Each overlapping tile is blended in `pool` (the encoder pool), not on the event loop: a
    1024 px frame's blend is ~18 ms of NumPy on this CPU, which the loop would otherwise spend
    while every other model's requests wait. The tiles of one request are blended one after
    another (they overlap). Placing a uint8 tile is a copy of its bytes: done on the loop."""
    spec = model.entry.spec
    pixels = model.tiles_as_pixels
    builder = (TilePlacer if pixels else TileBlender)(grid, spec["scale"], spec["channels"])
    loop = asyncio.get_running_loop()
    async with contextlib.aclosing(each_result(futures, state)) as results:
        async for index, output in results:
            if pixels:
                builder.add(index, output)
            else:
                await loop.run_in_executor(pool, builder.add, index, output)
    image = builder.result()
    if isinstance(image, np.ndarray):
        return image
    # tiles the runtime kept where it computed them were blended there: only uint8 leaves
    return (await loop.run_in_executor(pool, tensor_to_uint8, image[None], tuple(spec["value_range"])))[0]


async def assemble_pixels(model: LoadedModel, futures: list[asyncio.Future], state: RequestState, grid: TileGrid,
                          pool: Executor) -> np.ndarray:
    """`assemble_tiles`, always as uint8 [H·s, W·s, C]: what a `--workers` engine sends a front
    (a quarter of the float image's bytes)."""
    image = await assemble_tiles(model, futures, state, grid, pool)
    if image.dtype == np.uint8:
        return image
    value_range = tuple(model.entry.spec["value_range"])
    return (await asyncio.get_running_loop().run_in_executor(pool, to_uint8, image[None], value_range))[0]
