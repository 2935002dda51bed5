"""A Python client for the ganserve REST API, sync (`Client`) and async (`AsyncClient`); it needs
httpx, numpy and Pillow, not torch.

Images come back as PIL images (or, with `as_array=True`, one uint8 numpy array [N, H, W, C]).
Overload answers (429 queue full, 503 not ready / draining / over budget) are retried with
exponential backoff that honours the server's `Retry-After`; every other error is raised as one
exception type, `GanserveError`, carrying the status and the server's code and message.

    from ganserve.client import Client
    with Client("http://localhost:8000") as client:
        digits = client.generate("dcgan-digits", seeds=[1, 2, 3])        # 3 PIL images
        big = client.upscale("sr-rrdb-x4", Image.open("photo.png"))      # one PIL image
"""
from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from PIL import Image

RETRY_STATUSES = (429, 503)
NPY = {"format": "npy"}  # what image operations are asked to answer in: the client decodes it into arrays or PIL images
ImageInput = Image.Image | np.ndarray | bytes | str


class GanserveError(Exception):
    """An error answer: `status` (HTTP), `code` (the server's, e.g. `queue_full`), `message`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class Call:
    """One request, described once for both transports."""

    method: str
    path: str
    json: dict | None = None
    content: bytes | None = None
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


def error_of(response: httpx.Response) -> GanserveError:
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return GanserveError(response.status_code, "http_error", response.text[:500])
    if isinstance(error, str):  # the tensor protocol's shape
        return GanserveError(response.status_code, "error", error)
    return GanserveError(response.status_code, error.get("code", "error"), error.get("message", ""))


def retry_after(response: httpx.Response, attempt: int, backoff_s: float, max_wait_s: float) -> float:
    """The server's Retry-After if it sent one, else exponential backoff; capped."""
    try:
        wait = float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        wait = backoff_s * 2**attempt
    return min(max(wait, 0.0), max_wait_s)


def png_bytes(image: ImageInput) -> bytes:
    """A PIL image, a uint8 array [H, W, C] or [H, W] (what `as_array=True` answers, one of its
    items: a result sent straight back in raised AttributeError), encoded bytes (sent as they
    are) or a file path."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str):
        with open(image, "rb") as handle:
            return handle.read()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
            raise ValueError(f"an image array must be uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def npy_images(response: httpx.Response, as_array: bool) -> np.ndarray | list[Image.Image]:
    stack = np.load(io.BytesIO(response.content))  # [N, H, W, C] uint8
    if as_array:
        return stack
    return [Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame) for frame in stack]


def body(**fields: Any) -> dict:
    """A JSON body without the fields left at None; `class_` goes out as `class`."""
    if "class_" in fields:
        fields["class"] = fields.pop("class_")
    return {k: v for k, v in fields.items() if v is not None}


class Requests:
    """What each operation sends and how its answer is read, shared by the two clients."""

    @staticmethod
    def generate(model: str, seeds: list[int] | None, n: int | None, seed: int, class_: int | str | None, truncation_psi: float | None,
                 truncation: float | None, version: int | None) -> Call:
        return Call("POST", f"/v1/models/{model}/generate", json=body(seeds=seeds, n=n, seed=seed if seeds is None else None, class_=class_,
                                                                        truncation_psi=truncation_psi, truncation=truncation, version=version,
                                                                        format="npy"))

    @staticmethod
    def style_mix(model: str, row_seeds: list[int], col_seeds: list[int], layers: str | list[int], truncation_psi: float | None) -> Call:
        return Call("POST", f"/v1/models/{model}/style-mix", json=body(row_seeds=row_seeds, col_seeds=col_seeds, layers=layers,
                                                                         truncation_psi=truncation_psi, format="npy"))

    @staticmethod
    def interpolate(model: str, seeds: list[int] | None, w: list[list[float]] | None, steps: int, space: str) -> Call:
        return Call("POST", f"/v1/models/{model}/interpolate", json=body(seeds=seeds, w=w, steps=steps, space=space, format="npy"))

    @staticmethod
    def edit(model: str, seed: int, direction: str, strengths: list[float], units: str) -> Call:
        return Call("POST", f"/v1/models/{model}/edit", json=body(seed=seed, direction=direction, strengths=strengths, units=units, format="npy"))

    @staticmethod
    def image(model: str, endpoint: str, image: ImageInput, params: dict | None = None) -> Call:
        """An upload; `params` its query (image answers ask for npy: the client decodes it)."""
        return Call("POST", f"/v1/models/{model}/{endpoint}", content=png_bytes(image), params=params or {}, headers={"content-type": "image/png"})


class Client:
    """The sync client. `timeout_s` bounds each HTTP exchange; `retries` overload answers are
    retried (waiting at most `max_wait_s` each) before the last one is raised."""

    def __init__(self, base_url: str = "http://localhost:8000", timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25,
                 max_wait_s: float = 10.0) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)
        self.retries, self.backoff_s, self.max_wait_s = retries, backoff_s, max_wait_s

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def send(self, call: Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self.http.request(call.method, call.path, json=call.json, content=call.content, params=call.params, headers=call.headers)
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                raise error_of(response)
            time.sleep(retry_after(response, attempt, self.backoff_s, self.max_wait_s))
        raise AssertionError("unreachable")

    def models(self) -> list[dict]:
        return self.send(Call("GET", "/v1/models")).json()["models"]

    def generate(self, model: str, seeds: list[int] | None = None, n: int | None = None, seed: int = 0, class_: int | str | None = None,
                 truncation_psi: float | None = None, truncation: float | None = None, version: int | None = None, as_array: bool = False):
        return npy_images(self.send(Requests.generate(model, seeds, n, seed, class_, truncation_psi, truncation, version)), as_array)

    def style_mix(self, model: str, row_seeds: list[int], col_seeds: list[int], layers: str | list[int] = "fine",
                  truncation_psi: float | None = None, as_array: bool = False):
        """The grid row-major: image (i, j) has row i's styles with column j's at `layers`."""
        return npy_images(self.send(Requests.style_mix(model, row_seeds, col_seeds, layers, truncation_psi)), as_array)

    def interpolate(self, model: str, seeds: list[int] | None = None, w: list[list[float]] | None = None, steps: int = 8, space: str = "w",
                    as_array: bool = False):
        return npy_images(self.send(Requests.interpolate(model, seeds, w, steps, space)), as_array)

    def edit(self, model: str, seed: int, direction: str, strengths: list[float] = (-2.0, 0.0, 2.0), units: str = "sigma", as_array: bool = False):
        return npy_images(self.send(Requests.edit(model, seed, direction, list(strengths), units)), as_array)

    def translate(self, model: str, image: ImageInput, as_array: bool = False):
        images = npy_images(self.send(Requests.image(model, "translate", image, NPY)), as_array)
        return images[0]

    def upscale(self, model: str, image: ImageInput, as_array: bool = False):
        images = npy_images(self.send(Requests.image(model, "upscale", image, NPY)), as_array)
        return images[0]

    def project(self, model: str, image: ImageInput, steps: int = 200, poll_s: float = 0.5, timeout_s: float = 600.0) -> dict:
        """Projects an image into W and waits for the job: its `ws`, `psnr`, `steps` and the
        reconstruction as a PIL image (`reconstruction`)."""
        job = self.send(Requests.image(model, "project", image, {"steps": steps})).json()
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.send(Call("GET", job["status_url"])).json()
            if state["state"] in ("done", "failed", "cancelled"):
                return finished(state)
            if time.monotonic() > deadline:  # cancelled, so the server does not go on with what nobody will read
                self.send(Call("DELETE", job["status_url"]))
                raise timed_out(job, state, timeout_s)
            time.sleep(poll_s)


def timed_out(job: dict, state: dict, timeout_s: float) -> GanserveError:
    return GanserveError(504, "client_timeout", f"job {job['job_id']} still {state['state']} after {timeout_s:g} s: cancelled")


def finished(state: dict) -> dict:
    if state["state"] != "done":
        raise GanserveError(500 if state["state"] == "failed" else 503, f"job_{state['state']}", str(state.get("error") or state["state"]))
    result = dict(state["result"])
    result["reconstruction"] = Image.open(io.BytesIO(base64.b64decode(result["reconstruction"]["data"])))
    return result


class AsyncClient:
    """The same operations for asyncio code (`await client.generate(...)`)."""

    def __init__(self, base_url: str = "http://localhost:8000", timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25,
                 max_wait_s: float = 10.0) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.retries, self.backoff_s, self.max_wait_s = retries, backoff_s, max_wait_s

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def send(self, call: Call) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = await self.http.request(call.method, call.path, json=call.json, content=call.content, params=call.params, headers=call.headers)
            if response.status_code < 400:
                return response
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                raise error_of(response)
            await asyncio.sleep(retry_after(response, attempt, self.backoff_s, self.max_wait_s))
        raise AssertionError("unreachable")

    async def models(self) -> list[dict]:
        return (await self.send(Call("GET", "/v1/models"))).json()["models"]

    async def generate(self, model: str, seeds: list[int] | None = None, n: int | None = None, seed: int = 0, class_: int | str | None = None,
                       truncation_psi: float | None = None, truncation: float | None = None, version: int | None = None, as_array: bool = False):
        return npy_images(await self.send(Requests.generate(model, seeds, n, seed, class_, truncation_psi, truncation, version)), as_array)

    async def style_mix(self, model: str, row_seeds: list[int], col_seeds: list[int], layers: str | list[int] = "fine",
                        truncation_psi: float | None = None, as_array: bool = False):
        return npy_images(await self.send(Requests.style_mix(model, row_seeds, col_seeds, layers, truncation_psi)), as_array)

    async def interpolate(self, model: str, seeds: list[int] | None = None, w: list[list[float]] | None = None, steps: int = 8, space: str = "w",
                          as_array: bool = False):
        return npy_images(await self.send(Requests.interpolate(model, seeds, w, steps, space)), as_array)

    async def edit(self, model: str, seed: int, direction: str, strengths: list[float] = (-2.0, 0.0, 2.0), units: str = "sigma",
                   as_array: bool = False):
        return npy_images(await self.send(Requests.edit(model, seed, direction, list(strengths), units)), as_array)

    async def translate(self, model: str, image: ImageInput, as_array: bool = False):
        return npy_images(await self.send(Requests.image(model, "translate", image, NPY)), as_array)[0]

    async def upscale(self, model: str, image: ImageInput, as_array: bool = False):
        return npy_images(await self.send(Requests.image(model, "upscale", image, NPY)), as_array)[0]

    async def project(self, model: str, image: ImageInput, steps: int = 200, poll_s: float = 0.5, timeout_s: float = 600.0) -> dict:
        job = (await self.send(Requests.image(model, "project", image, {"steps": steps}))).json()
        deadline = time.monotonic() + timeout_s
        while True:
            state = (await self.send(Call("GET", job["status_url"]))).json()
            if state["state"] in ("done", "failed", "cancelled"):
                return finished(state)
            if time.monotonic() > deadline:
                await self.send(Call("DELETE", job["status_url"]))
                raise timed_out(job, state, timeout_s)
            await asyncio.sleep(poll_s)
