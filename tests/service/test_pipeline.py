"""The request path's own bounds: what a request waiting past its deadline is told (through the
real server: `test_admission.py`'s `test_admissions_refusals_are_counted_by_reason`)."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from service.errors import ApiError
from service.pipeline import in_pool


@pytest.mark.parametrize("own_pool", [False, True], ids=["the encoder pool", "a projection's upload turn"])
def test_a_wait_for_a_busy_image_pool_ends_at_the_deadline_with_504_and_drops_the_queued_work(own_pool):
    """A probe held both decoding threads for 70 s with two uploads: a small upscale's header check
    waited 41-61 s behind them, then was told 503 "retry in 1 s" with -24.9 s of its 30 left. Its
    wait now ends at its deadline with a 504, and its work, still queued, never runs. So does a
    projection's upload waiting for its one-at-a-time decoding thread (`JobStore.intake`)."""
    release, ran = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        registry = SimpleNamespace(encoders=None if own_pool else pool)
        pool.submit(release.wait, 10)  # the pool's one thread busy

        async def wait_behind_it() -> float:
            started = time.monotonic()
            with pytest.raises(ApiError) as refused:
                await in_pool(registry, ran.append, "ran", deadline=started + 0.3, pool=pool if own_pool else None)
            assert refused.value.status == 504 and ("its turn to decode" if own_pool else "encoder pool") in refused.value.message
            return time.monotonic() - started

        waited = asyncio.run(wait_behind_it())
        release.set()
    assert waited < 2 and ran == []  # answered at its deadline, not when the thread came free
