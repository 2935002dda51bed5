"""`ganserve.client` against the real server: every operation returns images of the right size,
the async client gives what the sync one gives, errors carry the server's code and message, an
overloaded or still-loading server is retried as its Retry-After says, and the module imports
without torch."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ganserve.client import AsyncClient, Client, GanserveError
from tests.serving import running_server


def test_the_client_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import ganserve.client; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-500:]


def test_every_operation_returns_images(server):
    with Client(server.url) as client:
        assert {m["name"] for m in client.models()} >= {"digits", "styles", "upx4"}
        digits = client.generate("digits", seeds=[1, 2, 3])
        assert len(digits) == 3 and all(isinstance(d, Image.Image) and d.size == (32, 32) for d in digits)
        assert np.array_equal(client.generate("digits", seed=2, n=1, as_array=True)[0], np.asarray(digits[1])[..., None])
        assert client.generate("cdigits", seeds=[4], class_=7, as_array=True).shape == (1, 32, 32, 1)
        assert len(client.style_mix("styles", [1, 2], [3], layers="coarse")) == 2
        assert client.interpolate("styles", seeds=[1, 2], steps=4, as_array=True).shape == (4, 16, 16, 3)
        assert len(client.edit("styles", 1, "size", [-1.0, 1.0])) == 2
        photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
        assert client.upscale("upx4", photo).size == (96, 80)
        assert client.translate("edges", photo).size == (24, 20)
        frames = client.interpolate("styles", seeds=[1, 2], steps=2, as_array=True)  # a result sent back in as it came (AttributeError)
        assert client.upscale("upx4", frames[0], as_array=True).shape == (64, 64, 3)
        projected = client.project("styles", photo, steps=3, poll_s=0.1)
        assert projected["steps"] == 3 and projected["reconstruction"].size == (16, 16) and len(projected["ws"]) == 6


def test_a_projection_the_client_stops_waiting_for_is_cancelled_on_the_server(server):
    photo = Image.new("RGB", (16, 16), (90, 20, 200))
    with Client(server.url) as client:
        with pytest.raises(GanserveError) as raised:
            client.project("styles", photo, steps=1000, poll_s=0.05, timeout_s=0.2)
        assert raised.value.status == 504 and raised.value.code == "client_timeout"
        status_url = f"/v1/jobs/{raised.value.message.split()[1]}"
        deadline = time.monotonic() + 30
        while (job := httpx.get(f"{server.url}{status_url}").json())["state"] != "cancelled":
            assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
            time.sleep(0.05)
    assert job["progress"]["step"] < 1000 and job["error"] == "cancelled by the client"


def test_the_async_client_gives_what_the_sync_one_gives(server):
    async def both():
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(client.generate("digits", seeds=[5, 6], as_array=True), client.upscale("upx4", b"not a png"),
                                        return_exceptions=True)

    images, error = asyncio.run(both())
    with Client(server.url) as client:
        assert np.array_equal(images, client.generate("digits", seeds=[5, 6], as_array=True))
    assert isinstance(error, GanserveError) and error.status == 422


def test_errors_carry_the_servers_code_and_message(server):
    with Client(server.url) as client:
        with pytest.raises(GanserveError) as raised:
            client.generate("nope", seeds=[1])
        assert raised.value.status == 404 and raised.value.code == "not_found" and "nope" in raised.value.message
        with pytest.raises(GanserveError) as raised:
            client.generate("digits", seeds=[1], class_=3)
        assert raised.value.status == 422


def test_a_server_still_loading_is_retried_until_it_answers(repository):
    with running_server(repository, wait=False) as server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{server.url}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        with Client(server.url, retries=200, backoff_s=0.05, max_wait_s=0.2) as client:
            images = client.generate("styles", seeds=[1])  # the style model loads last
        assert len(images) == 1
        refused = server.metric("ganserve_requests_total", model="styles", status="503")
    assert refused >= 1  # it was refused while loading, and the client went on
