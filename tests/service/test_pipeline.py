"""The request path's own bounds: what a request waiting past its deadline is told."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from service.errors import ApiError
from service.intake import RequestContext
from service.pipeline import execute_for, in_pool


def test_a_wait_for_a_busy_image_pool_ends_at_the_deadline_with_504_and_drops_the_queued_work():
    """A probe held both decoding threads for 70 s with two uploads: a small upscale's header check
    waited 41-61 s behind them, then was told 503 "retry in 1 s" with -24.9 s of its 30 left. Its
    wait now ends at its deadline with a 504, and its work, still queued, never runs."""
    release, ran = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        registry = SimpleNamespace(encoders=pool)
        pool.submit(release.wait, 10)  # the pool's one thread busy

        async def wait_behind_it() -> float:
            started = time.monotonic()
            with pytest.raises(ApiError) as refused:
                await in_pool(registry, ran.append, "ran", deadline=started + 0.3)
            assert refused.value.status == 504 and "encoder pool" in refused.value.message
            return time.monotonic() - started

        waited = asyncio.run(wait_behind_it())
        release.set()
    assert waited < 2 and ran == []  # answered at its deadline, not when the thread came free


def test_a_request_past_its_deadline_before_admission_is_504_not_told_to_retry():
    """Admission read a negative time left as a wait to retry after (503, `Retry-After: 1`)."""
    registry = SimpleNamespace(draining=False, settings=SimpleNamespace(request_timeout_s=30.0))
    late = RequestContext(time.monotonic() - 31.0)

    async def admit_it() -> None:
        await execute_for(registry, late, model=None, cost=None, work=None)

    with pytest.raises(ApiError) as refused:
        asyncio.run(admit_it())
    assert refused.value.status == 504 and "deadline passed" in refused.value.message
