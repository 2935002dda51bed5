"""What ONNX Runtime's host arena keeps between requests: no more than warm-up left in it, which
the memory budget's resident baseline counted (service/runtimes.py, `ArenaKeeper`)."""
import gc
from pathlib import Path

import numpy as np
import pytest

from bench.arena import wide_generator_entry
from service.memory import rss_bytes
from service.repository import ModelEntry, scan_repository
from service.runtimes import OnnxRuntime, warming

pytestmark = pytest.mark.quiet_host  # it reads this process's RSS: what other files left in an xdist worker's heap made warm-up's arena grow it 39 MiB, not > 50 (one run in three)

SIDE = 512  # 3 MiB an output image, 16 MiB of activations an image


@pytest.fixture(scope="module")
def wide_entry(tmp_path_factory) -> ModelEntry:
    return wide_generator_entry(tmp_path_factory.mktemp("wide"), SIDE)


def z(batch: int) -> dict[str, np.ndarray]:
    return {"z": np.random.default_rng(batch).standard_normal((batch, 4), dtype=np.float32)}


def warmed(entry: ModelEntry, batch: int) -> OnnxRuntime:
    runtime = OnnxRuntime(entry, "cpu", 1)
    with warming(runtime):
        runtime.run(z(batch))
        runtime.run(z(batch))
    return runtime


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


def test_outputs_a_request_holds_leave_nothing_in_the_arena_after_it(wide_entry):
    """A 100-image answer holds its rows until it is written: held in the arena's memory, they made
    the arena grow past them and keep that (+1 GB idle after one answer of a 1024² generator)."""
    runtime = warmed(wide_entry, 4)
    before = settled_rss()
    held = [runtime.run(z(4)) for _ in range(24)]  # 288 MiB of outputs
    assert held[0].shape == (4, 3, SIDE, SIDE) and np.abs(held[0]).max() > 0
    own_memory = [output.flags.owndata for output in held]
    del held
    kept = settled_rss() - before
    assert kept < 100 * 2**20, f"{kept / 2**20:.0f} MiB more resident after the outputs were let go"
    assert all(own_memory), "an output is the arena's memory"


def test_a_batch_larger_than_warm_ups_gives_back_what_it_added(wide_entry):
    """Batches up to warm-up's largest reuse what the arena holds; a larger one (a relaxed fit lets
    the batcher form it) is given back at its end, so idle memory stays what the budget counted."""
    runtime = warmed(wide_entry, 2)
    before = settled_rss()
    for _ in range(2):
        runtime.run(z(2))
    assert runtime.arena.shrinks == 0
    output = runtime.run(z(16))  # 256 MiB of activations
    assert output.shape == (16, 3, SIDE, SIDE)
    del output
    kept = settled_rss() - before
    assert runtime.arena.shrinks == 1
    assert kept < 100 * 2**20, f"{kept / 2**20:.0f} MiB more resident after a 16-image batch"


def test_the_arena_gives_the_same_images_as_a_session_without_one(wide_entry):
    runtime = warmed(wide_entry, 2)
    inputs = z(3)
    plain = OnnxRuntime(wide_entry, "cpu", 1)
    plain.arena = None  # session.run's own output
    np.testing.assert_array_equal(runtime.run(inputs), plain.run(inputs))


TILE = 96  # the default upscale tile


@pytest.fixture(scope="module")
def upscaler() -> ModelEntry:
    """The shipped x4 ESRGAN-lite: its graph takes any size, the server sends it tiles."""
    shipped = Path(__file__).resolve().parents[2] / "model_repository"
    return next(entry for entry in scan_repository(shipped) if entry.name == "sr-rrdb-x4")


def image(batch: int, side: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(side).uniform(-1, 1, (batch, 3, side, side)).astype(np.float32)}


def test_an_upscale_graph_keeps_an_arena_for_its_tiles_and_gives_back_any_other_size(upscaler):
    """Tiles reuse what warm-up's tile batches left in the arena (a 96² tile no longer faults its
    ~100 MB of activations in afresh every run); a larger tile batch runs in chunks of warm-up's
    in it (kept whole, the batcher's 64-tile batches of a tiny model held 1.25 GB); a v2 infer of
    another size (here 192²) runs in it too, and gives it all back at its end, so idle memory
    stays what the budget counted."""
    runtime = OnnxRuntime(upscaler, "cpu", 2)
    assert runtime.arena is not None, "an upscale graph runs without an arena"
    with warming(runtime):
        runtime.run(image(2, TILE))
    before = settled_rss()
    for batch in (1, 2, 5):
        assert runtime.run(image(batch, TILE)).shape == (batch, 3, 4 * TILE, 4 * TILE)
    assert runtime.arena.shrinks == 0
    assert settled_rss() - before < 50 * 2**20, "tile batches made the arena grow past warm-up's"
    output = runtime.run(image(1, 2 * TILE))
    assert output.shape == (1, 3, 8 * TILE, 8 * TILE) and output.flags.owndata
    del output
    assert runtime.arena.shrinks == 1
    assert settled_rss() - before < 50 * 2**20, "a larger input left its activations in the arena"


def test_an_upscale_graph_with_an_arena_gives_the_images_of_one_without(upscaler):
    runtime = OnnxRuntime(upscaler, "cpu", 2)
    with warming(runtime):
        runtime.run(image(2, TILE))
    plain = OnnxRuntime(upscaler, "cpu", 2)
    plain.arena = None  # session.run's own output
    for inputs in (image(2, TILE), image(5, TILE), image(1, 40)):  # in one run, in chunks of two, given back
        np.testing.assert_array_equal(runtime.run(inputs), plain.run(inputs))


def test_a_tile_arena_emptied_by_another_size_is_missing_from_memory_until_a_tile_batch_fills_it(upscaler):
    """Tile batches reserve no room for the arena's activations (`GraphCost.in_arena`): the
    resident baseline counts them. A v2 input of another size gives the arena back, so the
    registry adds what it lacks (`missing_bytes`) to any resident reading until a tile batch at
    warm-up's size has faulted it in again; that refill stays within the figure warm-up's cost
    gives it (two tiles' activations)."""
    from service.costs import measure_cost

    runtime = OnnxRuntime(upscaler, "cpu", 2)
    tiles = {1.0: image(1, TILE), 2.0: image(2, TILE)}
    grown = settled_rss()
    with warming(runtime):  # as the registry warms and measures a tile graph (`ModelRegistry.measure`)
        cost, _ = measure_cost(runtime.run, tiles.__getitem__, [(1.0, 1.0), (2.0, 2.0)], TILE * TILE, repeats=1)
    arena = runtime.arena
    arena.kept_bytes = cost.bytes_for(arena.kept_batch)
    assert arena.kept_batch == 2 and arena.holds and arena.missing_bytes() == 0 and settled_rss() - grown > 50 * 2**20
    runtime.run(image(1, 2 * TILE))
    given_back = settled_rss()
    assert not arena.holds and arena.missing_bytes() == arena.kept_bytes
    runtime.run(image(1, TILE))  # one tile fills part of it: still counted as missing
    assert arena.missing_bytes() == arena.kept_bytes
    runtime.run(image(5, TILE))  # in chunks of two: warm-up's batch again
    refilled = settled_rss() - given_back
    assert arena.holds and arena.missing_bytes() == 0
    assert 0 < refilled <= arena.kept_bytes, f"the refill took {refilled / 2**20:.0f} MiB"
