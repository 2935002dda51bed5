"""A hostile client against `ganserve serve` of the shipped repository: every request below was
once a crash, a 500, gigabytes of memory or a wrong answer. Each must now get its right status
with a JSON error body, leave /health/ready answering, and the server's peak RSS must stay under
the memory budget it was given."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.http_protocol import ClientCausedWarnings
from tests.serving import running_server

SHIPPED = Path(__file__).resolve().parents[2] / "model_repository"
GIB = 1024**3
BUDGET = 2 * GIB
V1 = "/v1/models"


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 128 if mode == "L" else (128, 60, 20)).save(buffer, "PNG")
    return buffer.getvalue()


def webp_lossless(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (9, 9, 9)).save(buffer, "WEBP", lossless=True)
    return buffer.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    """An 8x8 JPEG whose frame header claims `width` x `height` (631 bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, height, width)
    return bytes(data)


def png_declaring(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims `width` x `height`."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def multipart(parts: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "hostileboundary"
    body = b"".join(f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="x.png"\r\ncontent-type: image/png\r\n\r\n'.encode()
                    + data + b"\r\n" for name, data in parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def z_tensor(values: int = 64) -> dict:
    return {"name": "z", "shape": [1, values], "datatype": "FP32", "data": [0.0] * values}


JSON = {"content-type": "application/json"}
PNG = {"content-type": "image/png"}
SMALL = png(24, 24, "RGB")
MULTI_TWO_FILES = multipart([("file", SMALL), ("file", SMALL)])
MULTI_NO_FILE = multipart([("other", SMALL)])

# (name, method, path, {json|content, headers}, expected status)
CASES = [
    # numbers the schema must bound before anything is allocated
    ("n 10^25 (once killed the process)", "POST", f"{V1}/dcgan-digits/generate", {"json": {"n": 10**25}}, 422),
    ("n 3e7", "POST", f"{V1}/dcgan-digits/generate", {"json": {"n": 30_000_000}}, 422),
    ("n past the per-request limit", "POST", f"{V1}/dcgan-digits/generate", {"json": {"n": 257}}, 422),
    ("a million seeds (6.9 MB: past the JSON body cap)", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seeds": list(range(1_000_000))}}, 413),
    ("300 seeds", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seeds": list(range(300))}}, 422),
    ("seeds and seed (seed was silently ignored)", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seeds": [1], "seed": 2}}, 422),
    ("seed 2^63", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seed": 2**63}}, 422),
    ("seed + n past the last seed", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seed": 2**63 - 2, "n": 5}}, 422),
    ("true as a seed", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seed": True}}, 422),
    ("true as a class", "POST", f"{V1}/cdcgan-digits/generate", {"json": {"class": True}}, 422),
    ("class 10^30", "POST", f"{V1}/cdcgan-digits/generate", {"json": {"class": 10**30}}, 422),
    ("columns 0", "POST", f"{V1}/dcgan-digits/generate", {"json": {"n": 4, "columns": 0}}, 422),
    ("version 2^40", "POST", f"{V1}/dcgan-digits/generate", {"json": {"version": 2**40}}, 422),
    ("a 200-digit integer", "POST", f"{V1}/dcgan-digits/generate", {"content": b'{"seed": ' + b"9" * 200 + b"}", "headers": JSON}, 422),
    ("a 5000-digit integer", "POST", f"{V1}/dcgan-digits/generate", {"content": b'{"seed": ' + b"9" * 5000 + b"}", "headers": JSON}, 422),
    ("JSON nested 100000 deep", "POST", f"{V1}/dcgan-digits/generate", {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON}, 422),
    ("style-mix row seed 2^64", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [2**64], "col_seeds": [1]}}, 422),
    ("style-mix row seed below -2^63", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [-(2**63) - 1], "col_seeds": [1]}}, 422),
    ("style-mix negative seed", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [-1], "col_seeds": [1]}}, 422),
    ("style-mix 17 rows", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": list(range(17)), "col_seeds": [1]}}, 422),
    ("style-mix layer 10^9", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [1], "col_seeds": [2], "layers": [10**9]}}, 422),
    ("interpolate 10^9 steps", "POST", f"{V1}/stylegan-shapes/interpolate", {"json": {"seeds": [1, 2], "steps": 10**9}}, 422),
    ("interpolate w of 10^5 values (1 MB: past the JSON body cap)", "POST", f"{V1}/stylegan-shapes/interpolate", {"json": {"w": [[0.0] * 100_000] * 2}}, 413),
    ("interpolate w of 5000 values", "POST", f"{V1}/stylegan-shapes/interpolate", {"json": {"w": [[0.0] * 5000] * 2}}, 422),
    ("700,000 unknown keys (once 6 s of event loop and 0.9 GB for a 422)", "POST", f"{V1}/stylegan-shapes/edit",
     {"content": ("{" + ",".join(f'"k{i}":0' for i in range(700_000)) + ',"seed":1,"direction":"size"}').encode(), "headers": JSON}, 413),
    ("20,000 unknown keys", "POST", f"{V1}/stylegan-shapes/edit",
     {"content": ("{" + ",".join(f'"k{i}":0' for i in range(20_000)) + ',"seed":1,"direction":"size"}').encode(), "headers": JSON}, 422),
    ("2.5 million empty lists as strengths", "POST", f"{V1}/stylegan-shapes/edit",
     {"content": b'{"seed": 1, "direction": "size", "strengths": [' + b"[]," * 2_500_000 + b"[]]}", "headers": JSON}, 413),
    ("edit strength 1e308", "POST", f"{V1}/stylegan-shapes/edit", {"json": {"seed": 1, "direction": "size", "strengths": [1e308]}}, 422),
    ("edit 65 strengths", "POST", f"{V1}/stylegan-shapes/edit", {"json": {"seed": 1, "direction": "size", "strengths": [0.0] * 65}}, 422),
    ("edit NaN in w", "POST", f"{V1}/stylegan-shapes/edit", {"content": b'{"w": [NaN], "direction": "size"}', "headers": JSON}, 422),
    ("project 10^9 steps", "POST", f"{V1}/stylegan-shapes/project?steps=1000000000", {"content": SMALL, "headers": PNG}, 422),
    # uploads: checked from the header before a pixel is decoded
    ("16 KB grey 4096² PNG to translate", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": png(4096, 4096), "headers": PNG}, 413),
    ("631-byte JPEG declaring 4000²", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": jpeg_declaring(4000, 4000), "headers": {"content-type": "image/jpeg"}}, 413),
    ("706-byte lossless WebP of 16383x1000", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": webp_lossless(16383, 1000), "headers": {"content-type": "image/webp"}}, 413),
    ("PNG declaring 20000² (a decompression bomb)", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": png_declaring(20000, 20000), "headers": PNG}, 413),
    ("PNG declaring 60000x1 strip to upscale", "POST", f"{V1}/sr-rrdb-x4/upscale", {"content": png_declaring(60000, 1), "headers": PNG}, 413),
    ("1024² upscale (minutes of tiles on a CPU)", "POST", f"{V1}/sr-rrdb-x4/upscale", {"content": png(1024, 1024, "RGB"), "headers": PNG}, 413),
    ("PNG declaring 4096² for projection", "POST", f"{V1}/stylegan-shapes/project", {"content": png_declaring(5000, 5000), "headers": PNG}, 413),
    ("garbage as image/png", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": b"\x89PNG not really" * 10, "headers": PNG}, 422),
    ("a GIF sent as image/png", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": b"GIF89a" + b"\0" * 64, "headers": PNG}, 422),
    ("empty upload", "POST", f"{V1}/sr-rrdb-x4/upscale", {"content": b"", "headers": PNG}, 422),
    ("text/plain upload", "POST", f"{V1}/sr-rrdb-x4/upscale", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("multipart with two files", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": MULTI_TWO_FILES[0], "headers": {"content-type": MULTI_TWO_FILES[1]}}, 422),
    ("multipart without a file part", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": MULTI_NO_FILE[0], "headers": {"content-type": MULTI_NO_FILE[1]}}, 422),
    ("multipart without a boundary", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 422),
    ("fit=stretch", "POST", f"{V1}/cyclegan-thin2thick/translate?fit=stretch", {"content": SMALL, "headers": PNG}, 422),
    ("format=gif on translate", "POST", f"{V1}/cyclegan-thin2thick/translate?format=gif", {"content": SMALL, "headers": PNG}, 422),
    # content negotiation: 406, never a 500
    ("Accept gif on generate", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seed": 1}, "headers": {"accept": "image/gif"}}, 406),
    ("Accept gif on style-mix", "POST", f"{V1}/stylegan-shapes/style-mix", {"json": {"row_seeds": [1], "col_seeds": [2]}, "headers": {"accept": "image/gif"}}, 406),
    ("Accept gif on edit", "POST", f"{V1}/stylegan-shapes/edit", {"json": {"seed": 1, "direction": "size"}, "headers": {"accept": "image/gif"}}, 406),
    ("Accept gif on translate", "POST", f"{V1}/cyclegan-thin2thick/translate", {"content": SMALL, "headers": PNG | {"accept": "image/gif"}}, 406),
    ("Accept gif on upscale", "POST", f"{V1}/sr-rrdb-x4/upscale", {"content": SMALL, "headers": PNG | {"accept": "image/gif"}}, 406),
    # v2: the same bounds as v1
    ("v2 [1,3,384,384] to SR (154 MB of JSON)", "POST", "/v2/models/sr-rrdb-x4/infer",
     {"json": {"inputs": [{"name": "image", "shape": [1, 3, 384, 384], "datatype": "FP32", "data": [0.0] * (3 * 384 * 384)}]}}, 413),
    ("v2 cyclegan [1,1,4,4]", "POST", "/v2/models/cyclegan-thin2thick/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 1, 4, 4], "datatype": "FP32", "data": [0.0] * 16}]}}, 422),
    ("v2 label 2^63", "POST", "/v2/models/cdcgan-digits/infer",
     {"json": {"inputs": [z_tensor(), {"name": "label", "shape": [1], "datatype": "INT64", "data": [2**63]}]}}, 422),
    ("v2 INT64 label 1.7", "POST", "/v2/models/cdcgan-digits/infer",
     {"json": {"inputs": [z_tensor(), {"name": "label", "shape": [1], "datatype": "INT64", "data": [1.7]}]}}, 422),
    ("v2 label true", "POST", "/v2/models/cdcgan-digits/infer",
     {"json": {"inputs": [z_tensor(), {"name": "label", "shape": [1], "datatype": "INT64", "data": [True]}]}}, 422),
    ("v2 duplicate input names", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [z_tensor(), z_tensor()]}}, 422),
    ("v2 batch of 2^31", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [{**z_tensor(), "shape": [2**31, 64]}]}}, 422),
    ("v2 negative shape", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [{**z_tensor(), "shape": [-1, 64]}]}}, 422),
    ("v2 data of strings", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [{**z_tensor(), "data": ["a"] * 64}]}}, 422),
    ("v2 FP32 past float32's range", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [{**z_tensor(), "data": [1e300] * 64}]}}, 422),
    ("v2 FP32 3e38 to a style model (once NaN in a JSON answer)", "POST", "/v2/models/stylegan-shapes/infer",
     {"json": {"inputs": [{"name": "ws", "shape": [1, 8, 64], "datatype": "FP32", "data": [3e38] * 512}]}}, 422),
    ("v2 header length '²' (once a 500)", "POST", "/v2/models/dcgan-digits/infer",
     {"json": {"inputs": [z_tensor()]}, "headers": {"inference-header-content-length": b"\xb2"}}, 422),
    ("v2 header length of 4301 digits (once a 500)", "POST", "/v2/models/dcgan-digits/infer",
     {"json": {"inputs": [z_tensor()]}, "headers": {"inference-header-content-length": "9" * 4301}}, 422),
    ("v2 4 MB of JSON values for a 64-value input (once parsed whole before any count check)", "POST", "/v2/models/dcgan-digits/infer",
     {"content": b'{"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [' + b"1.5," * 1_000_000 + b'1.5]}]}', "headers": JSON}, 413),
    ("v2 800 KB of `0,` for a 64-value input: under the byte limit, 400 k values (once parsed whole, then 422)", "POST", "/v2/models/dcgan-digits/infer",
     {"content": b'{"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [' + b"0," * 400_000 + b'0]}]}', "headers": JSON}, 413),
    ("v2 1.4 MB of JSON values to an image model (once parsed whole before any check: 422)", "POST", "/v2/models/cyclegan-thin2thick/infer",
     {"content": b'{"inputs": [{"name": "image", "shape": [1, 1, 64, 64], "datatype": "FP32", "data": [' + b"0.5," * 359_999 + b'0.5]}]}', "headers": JSON}, 413),
    ("v2 binary_data_output as the string 'false' (once truthy: a binary answer)", "POST", "/v2/models/dcgan-digits/infer",
     {"json": {"inputs": [z_tensor()], "parameters": {"binary_data_output": "false"}}}, 422),
    ("v2 true as an FP32 value", "POST", "/v2/models/dcgan-digits/infer", {"json": {"inputs": [{**z_tensor(), "data": [True] * 64}]}}, 422),
    ("v2 binary_data_size as a string", "POST", "/v2/models/dcgan-digits/infer",
     {"json": {"inputs": [{**z_tensor(), "data": None, "parameters": {"binary_data_size": "256"}}]}}, 422),
    ("edit strength as a string", "POST", f"{V1}/stylegan-shapes/edit", {"json": {"seed": 1, "direction": "size", "strengths": ["1"]}}, 422),
    ("truncation_psi as a string", "POST", f"{V1}/stylegan-shapes/generate", {"json": {"seed": 1, "truncation_psi": "0.7"}}, 422),
    ("v2 not JSON", "POST", "/v2/models/dcgan-digits/infer", {"content": b"{nope", "headers": JSON}, 422),
    ("v2 unknown model", "POST", "/v2/models/nope/infer", {"json": {"inputs": [z_tensor()]}}, 404),
    # integers written as text (paths, queries): ASCII digits only, as README says
    ("v2 version path 1.0 (once version 1)", "POST", "/v2/models/dcgan-digits/versions/1.0/infer", {"json": {"inputs": [z_tensor()]}}, 422),
    ("query version +1 on upscale", "POST", f"{V1}/sr-rrdb-x4/upscale?version=+1", {"content": SMALL, "headers": PNG}, 422),
    ("v2 version path 01 (once version 1: two names for one version)", "GET", "/v2/models/dcgan-digits/versions/01", {}, 422),
    ("query version 01 on upscale (once version 1)", "POST", f"{V1}/sr-rrdb-x4/upscale?version=01", {"content": SMALL, "headers": PNG}, 422),
    ("project steps 1_0", "POST", f"{V1}/stylegan-shapes/project?steps=1_0", {"content": SMALL, "headers": PNG}, 422),
    ("project version 99 (once ran the latest version)", "POST", f"{V1}/stylegan-shapes/project?steps=1&version=99", {"content": SMALL, "headers": PNG}, 404),
    ("project with an unknown query parameter", "POST", f"{V1}/stylegan-shapes/project?steps=1&foo=1", {"content": SMALL, "headers": PNG}, 422),
    ("upscale with an unknown query parameter", "POST", f"{V1}/sr-rrdb-x4/upscale?scale=8", {"content": SMALL, "headers": PNG}, 422),
    ("v2 infer asking for one output twice (answered binary without a word)", "POST", "/v2/models/dcgan-digits/infer",
     {"json": {"inputs": [z_tensor()], "outputs": [{"name": "image"}, {"name": "image", "parameters": {"binary_data": True}}]}}, 422),
    ("the model list with an unknown query parameter (was 200)", "GET", f"{V1}?x=1", {}, 422),
    ("a model's details with an unknown query parameter (was 200)", "GET", f"{V1}/dcgan-digits?x=1", {}, 422),
    ("project steps given twice (once ran the last without a word)", "POST", f"{V1}/stylegan-shapes/project?steps=20&steps=30",
     {"content": SMALL, "headers": PNG}, 422),
    ("upscale format given twice", "POST", f"{V1}/sr-rrdb-x4/upscale?format=png&format=jpeg", {"content": SMALL, "headers": PNG}, 422),
    # compressed bodies are refused before they are read (tritonclient's gzip request was "not valid JSON"); a second
    # header saying identity does not hide the first (a proxy may read it)
    ("a gzip body", "POST", f"{V1}/dcgan-digits/generate", {"content": gzip.compress(b'{"seed": 1}'), "headers": JSON | {"content-encoding": "gzip"}}, 415),
    ("gzip, then identity", "POST", f"{V1}/dcgan-digits/generate",
     {"content": gzip.compress(b'{"seed": 1}'), "headers": [("content-type", "application/json"), ("content-encoding", "gzip"), ("content-encoding", "identity")]}, 415),
    # an expectation the server does not meet was answered as if met (RFC 9110: 417)
    ("Expect: 200-ok", "POST", f"{V1}/dcgan-digits/generate", {"json": {"seed": 1}, "headers": {"expect": "200-ok"}}, 417),
    # the rest of the matrix
    ("unknown model", "POST", f"{V1}/nope/generate", {"json": {}}, 404),
    ("unknown version", "POST", f"{V1}/dcgan-digits/generate", {"json": {"version": 7}}, 404),
    ("style-mix on a DCGAN", "POST", f"{V1}/dcgan-digits/style-mix", {"json": {"row_seeds": [1], "col_seeds": [2]}}, 422),
    ("translate on an SR model", "POST", f"{V1}/sr-rrdb-x4/translate", {"content": SMALL, "headers": PNG}, 422),
    ("GET on a POST route", "GET", f"{V1}/dcgan-digits/generate", {}, 405),
    ("a trailing slash and a forged Host (once a 307 to that host)", "GET", "/v1/jobs/abc/", {"headers": {"host": "evil.example"}}, 404),
]


@pytest.fixture(scope="module")
def shipped():
    with running_server(SHIPPED, memory_budget=BUDGET, header_timeout_s=1, body_timeout_s=3) as server:
        yield server


@pytest.mark.parametrize("name,method,path,options,status", CASES, ids=[case[0] for case in CASES])
def test_a_hostile_request_gets_its_status_and_a_json_error_and_the_server_stays_up(shipped, name, method, path, options, status):
    with shipped.client(timeout=60) as client:
        response = client.request(method, path, **options)
        assert response.status_code == status, response.text[:500]
        error = response.json()["error"]
        message = error if path.startswith("/v2/") else error["message"]  # the tensor protocol's shape: {"error": "message"}
        assert message and (path.startswith("/v2/") or error["code"])
        assert "/work/" not in message and "/tmp/" not in message
        assert client.get("/health/ready").status_code == 200
    assert peak_rss(shipped.process.pid) < BUDGET


def with_chunk(picture: bytes, kind: bytes, data: bytes, before_pixels: bool) -> bytes:
    """`picture` (a PNG) with one more chunk, after its header or before its end."""
    at = 33 if before_pixels else picture.rindex(b"IEND") - 4
    return picture[:at] + struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)) + picture[at:]


def test_a_png_whose_header_is_over_pillows_limits_is_named_a_png(shipped):
    """A zTXt or iCCP chunk that inflates past Pillow's 1 MiB cap is refused 422, before its
    pixels are decoded where it lies before them, and the message says what is wrong with it in
    our words (it was Pillow's "PngImagePlugin.MAX_TEXT_CHUNK") instead of calling it no PNG."""
    inflating = zlib.compress(b"\0" * 2_000_000)
    bombs = [with_chunk(png(8, 8), b"zTXt", b"comment\0\0" + inflating, before_pixels=True),
             with_chunk(png(8, 8), b"iCCP", b"profile\0\0" + inflating, before_pixels=True),
             with_chunk(png(8, 8), b"zTXt", b"comment\0\0" + inflating, before_pixels=False)]
    with shipped.client() as client:
        refused = [client.post(f"{V1}/cyclegan-thin2thick/translate", content=bomb, headers=PNG) for bomb in bombs]
        garbage = client.post(f"{V1}/cyclegan-thin2thick/translate", content=b"\x89PNG not really" * 10, headers=PNG)
        many = png(8, 8)  # each chunk under the one-chunk cap, 80 of them past Pillow's 64 MiB for all (a probe: Pillow's words)
        for _ in range(80):
            many = with_chunk(many, b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * 1_000_000), before_pixels=True)
        summed = client.post(f"{V1}/cyclegan-thin2thick/translate", content=many, headers=PNG)
    for response in refused:
        message = response.json()["error"]["message"]
        assert response.status_code == 422 and "compressed text or ICC-profile chunks inflates past 1 MiB" in message, response.text
        assert "MAX_TEXT_CHUNK" not in message
    assert "header could not be read" in refused[0].json()["error"]["message"]
    assert summed.status_code == 422 and "text chunks together inflate past 64 MiB" in summed.json()["error"]["message"], summed.text
    assert garbage.status_code == 422 and "not a PNG, JPEG or WebP" in garbage.json()["error"]["message"]


def test_a_tiny_image_is_translated_at_its_own_size(shipped):
    """Sides of 1–4 px once reached ONNX's Pad with an error text for the client (500)."""
    with shipped.client() as client:
        for size in [(1, 1), (4, 4), (3, 40)]:
            response = client.post(f"{V1}/cyclegan-thin2thick/translate", content=png(*size), headers=PNG)
            assert response.status_code == 200, response.text
            assert Image.open(io.BytesIO(response.content)).size == size


def test_a_multipart_body_cut_before_its_closing_boundary_is_named_so(shipped):
    """A form whose only part never ends (the body stops before `--boundary--`: a client that
    forgot it, or a truncated upload) was answered as one without a `file` part, which it has."""
    whole, content_type = multipart([("file", SMALL)])
    cut = whole[:-len(b"--hostileboundary--\r\n")]
    with shipped.client() as client:
        truncated = client.post(f"{V1}/cyclegan-thin2thick/translate", content=cut, headers={"content-type": content_type})
        no_file = client.post(f"{V1}/cyclegan-thin2thick/translate", content=MULTI_NO_FILE[0], headers={"content-type": MULTI_NO_FILE[1]})
    assert truncated.status_code == 422 and "closing boundary" in truncated.json()["error"]["message"], truncated.text
    assert no_file.status_code == 422 and "needs a 'file' part" in no_file.json()["error"]["message"], no_file.text


def test_an_empty_file_part_or_one_without_a_filename_is_named_for_what_it_is(shipped):
    """An empty `file` part was answered "the request body is empty", and a `file` part without a
    filename (a plain field to the parser) "needs a 'file' part", which it had."""
    empty, content_type = multipart([("file", b"")])
    plain = b'--B\r\ncontent-disposition: form-data; name="file"\r\n\r\n' + SMALL + b"\r\n--B--\r\n"
    with shipped.client() as client:
        answers = [client.post(f"{V1}/cyclegan-thin2thick/translate", content=body, headers={"content-type": kind})
                   for body, kind in ((empty, content_type), (plain, "multipart/form-data; boundary=B"))]
    assert [a.status_code for a in answers] == [422, 422]
    assert "'file' part is empty" in answers[0].json()["error"]["message"]
    assert "has no filename" in answers[1].json()["error"]["message"]


def test_a_chunked_body_over_the_limit_is_413_not_400(shipped):
    def chunks():
        yield b'{"seeds": ['
        for _ in range(600):
            yield b"1," * 8192
        yield b"1]}"

    with shipped.client() as client:
        response = client.post(f"{V1}/dcgan-digits/generate", content=chunks(), headers=JSON)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def read_until_closed(sock: socket.socket, wait_s: float) -> bytes:
    sock.settimeout(wait_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def still_open_while_reading(sock: socket.socket, wait_s: float = 0.5) -> bool:
    """Whether a connection with an answer coming is still open: read all that arrives within
    `wait_s` (an aborted one ends in a reset or an end of stream)."""
    sock.settimeout(wait_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    return False


def still_open(sock: socket.socket, wait_s: float = 0.3) -> bool:
    """Whether the server kept this connection (one that sent nothing) open."""
    sock.settimeout(wait_s)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def raw_exchange(server, request: bytes, wait_s: float = 5) -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait_s) as sock:
        if request:
            sock.sendall(request)
        return read_until_closed(sock, wait_s)


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body_is_read(shipped):
    answer = raw_exchange(shipped, b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                   b"content-length: 1000000000000\r\n\r\n{")
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer


def test_a_body_that_says_it_is_not_compressed_is_served_however_it_says_so(shipped):
    with shipped.client() as client:
        for saying in ("identity", "identity, identity", "", "IDENTITY"):
            answer = client.post(f"{V1}/dcgan-digits/generate", json={"seed": 1}, headers={"content-encoding": saying})
            assert answer.status_code == 200, (saying, answer.text[:200])


def test_a_transfer_coding_other_than_chunked_is_501_not_read_as_plain(shipped):
    """`Transfer-Encoding: gzip, chunked` was unchunked and its gzip bytes read as the body (a plain
    body so sent was served, a gzipped one "could not be parsed"); RFC 9112 says 501."""
    body = gzip.compress(b'{"seed": 1}')
    request = (b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
               b"transfer-encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    answer = raw_exchange(shipped, request)
    assert answer.startswith(b"HTTP/1.1 501") and b"no transfer coding but chunked" in answer, answer[:300]
    plain = b'{"seed": 1}'
    served = raw_exchange(shipped, b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                   b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(plain), plain))
    assert served.startswith(b"HTTP/1.1 200"), served[:300]


def test_a_json_body_over_its_limit_is_413_and_a_declared_one_before_it_is_sent(shipped):
    """JSON operations take 256 KiB (GANSERVE_MAX_JSON_BODY_BYTES); a body declared at 4 MiB was
    read whole (held, waiting for its bytes) before the 413."""
    with shipped.client() as client:
        padded = client.post(f"{V1}/dcgan-digits/generate", content=b'{"seed": 1}' + b" " * 300_000, headers={"content-type": "application/json"})
    assert padded.status_code == 413 and "GANSERVE_MAX_JSON_BODY_BYTES" in padded.json()["error"]["message"]
    started = time.perf_counter()
    answer = raw_exchange(shipped, b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                                   b"content-length: 4194304\r\n\r\n{\"seed\"", wait_s=10)
    assert answer.startswith(b"HTTP/1.1 413") and b"4194304 bytes" in answer, answer[:300]
    assert time.perf_counter() - started < 5  # answered, not waited out (the body timeout is 30 s)


def test_a_small_body_of_another_content_type_is_415_on_a_connection_that_stays_open(shipped):
    """Refusing on the headers closes the connection (its body unread); a small body is cheaper read,
    and its 415 comes from the route with the connection kept for the client's next request (it was
    closed, for one stray `-d` in a script reusing its connection)."""
    request = (b"POST /v1/models/stylegan-shapes/edit HTTP/1.1\r\nHost: x\r\ncontent-type: text/xml\r\n"
               b"content-length: 7\r\n\r\n<seed/>"
               b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = raw_exchange(shipped, request)
    assert answer.startswith(b"HTTP/1.1 415") and b"(got 'text/xml')" in answer, answer[:300]
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200" in answer, answer[-300:]


@pytest.mark.parametrize("length", [4_194_304, 40], ids=["past the JSON bound", "small"])
def test_a_json_operation_sent_another_content_type_is_415_before_its_body_is_read(shipped, length):
    """A hostile probe sent 8 MB as text/xml to a JSON operation with `Expect: 100-continue`: the
    server answered "100 Continue", read it all, then 415; declared past the JSON bound, it was told
    its size (413), not its mistake. Now the 415 comes on the headers, with no 100 Continue, and
    the connection is closed, as for the 413 on a declared length; a JSON body is still served."""
    started = time.perf_counter()
    answer = raw_exchange(shipped, b"POST /v1/models/stylegan-shapes/edit HTTP/1.1\r\nHost: x\r\ncontent-type: text/xml\r\n"
                                   b"expect: 100-continue\r\ncontent-length: %d\r\n\r\n" % length, wait_s=10)
    assert answer.startswith(b"HTTP/1.1 415") and b"send the request body as application/json (got 'text/xml')" in answer, answer[:300]
    assert b"100 Continue" not in answer and b"connection: close" in answer.lower()
    assert time.perf_counter() - started < 5  # answered on the headers, not after the body timeout (30 s)
    with shipped.client() as client:
        assert client.post(f"{V1}/dcgan-digits/generate", json={"seed": 1}).status_code == 200


@pytest.mark.parametrize(("path", "media", "status", "says"), [
    ("/v1/models/dcgan-digit/upscale", "image/png", 404, b"dcgan-digit"),
    ("/v1/models/dcgan-digits/upscale", "image/png", 422, b"not a super_resolution model"),
    ("/v1/models/sr-rrdb-x4/upscale", "text/xml", 415, b"send the image as"),
    ("/v1/models/sr-rrdb-x4/translate", "image/png", 422, b"not a translation model"),
    ("/v2/models/dcgan-digit/infer", "application/octet-stream", 404, b"dcgan-digit"),
    ("/v1/models/dcgan-digits/project", "image/png", 422, b"needs a style model"),
    ("/v1/models/stylegan-shapes/project", "text/xml", 415, b"send the image as"),
    ("/v1/models/sr-rrdb-x4/upscale?version=99", "image/png", 404, b"has no version 99"),
    ("/v2/models/dcgan-digits/versions/99/infer", "application/octet-stream", 404, b"has no version 99"),
    ("/v1/models/stylegan-shapes/project?steps=5000", "image/png", 422, b"steps: at most"),
    ("/v1/models/stylegan-shapes/project?version=99&steps=10", "image/png", 404, b"has no version 99"),
    ("/v1/models/sr-rrdb-x4/upscale", "image/png\r\naccept: text/html", 406, b"cannot answer with 'text/html'"),
    ("/v1/models/sr-rrdb-x4/upscale?format=bogus", "image/png", 422, b"format: "),
    ("/v1/models/sr-rrdb-x4/upscale?zzz=1", "image/png", 422, b"unknown query parameter 'zzz'"),
    ("/v1/models/sr-rrdb-x4/translate?fit=bogus", "image/png", 422, b"fit: "),
    ("/v1/models/stylegan-shapes/project?steps=abc", "image/png", 422, b"steps: "),
    ("/v2/models/dcgan-digits/versions/abc/infer", "application/octet-stream", 422, b"version: "),
    ("/v2/models/dcgan-digits/infer", "application/octet-stream\r\ninference-header-content-length: abc", 422, b"must be an integer"),
    ("/v2/models/dcgan-digits/infer", "application/octet-stream\r\ninference-header-content-length: 9000000", 422,
     b"does not fit a body of 8000000 bytes"),
    ("/v2/models/dcgan-digits/infer", "application/octet-stream\r\ninference-header-content-length: 106\r\ninference-header-content-length: 5",
     422, b"given twice"),
], ids=["unknown model", "another kind", "content type", "translate to an upscaler", "v2 unknown model", "projection to a DCGAN",
        "projection content type", "unknown version", "v2 unknown version", "projection steps", "projection version", "accept",
        "a query value its type refuses", "an unknown query parameter", "translate's fit", "projection steps not a number",
        "v2 version not a number", "v2 header length not a count", "v2 header length past the body", "v2 header length twice"])
def test_an_upload_its_headers_refuse_is_answered_before_its_body_is_read(shipped, path, media, status, says):
    """A hostile probe sent 8 MB with `Expect: 100-continue` to a misspelt model, to a model of
    another kind and as text/xml: each was told "100 Continue", read whole (reserved in the memory
    budget as it came) and only then refused. Now the path, query and headers are enough (a
    version, a projection's steps, an `Accept` too): refused at once, with no 100 Continue and the
    connection closed (the shipped server's body timeout is 3 s). So are the 422s the headers
    decide: a parameter its type refuses or one the operation does not take (a second probe's
    `?format=bogus` and `/versions/abc/infer` were read whole first), and an
    `Inference-Header-Content-Length` that is no count within the body. The `--workers` front's
    projection route is checked the same way (`test_workers.py`)."""
    started = time.perf_counter()
    answer = raw_exchange(shipped, b"POST %s HTTP/1.1\r\nHost: x\r\ncontent-type: %s\r\nexpect: 100-continue\r\n"
                                   b"content-length: 8000000\r\n\r\n" % (path.encode(), media.encode()), wait_s=10)
    assert answer.startswith(b"HTTP/1.1 %d" % status) and says in answer, answer[:400]
    assert b"100 Continue" not in answer and b"connection: close" in answer.lower()
    assert time.perf_counter() - started < 2.5  # answered on its headers, not at the body timeout


@pytest.mark.parametrize("path", ["/v1/models/sr-rrdb-x4/upscale?format=bogus", "/v1/models/stylegan-shapes/project?steps=abc&zzz=1",
                                  "/v2/models/dcgan-digits/versions/abc/infer"])
def test_a_parameter_refused_on_the_headers_is_told_what_the_route_tells_it(shipped, path):
    """The same 422, word for word, whether the headers refuse it before a large body is read or
    the route does once it has read a small one."""
    media = b"application/octet-stream" if path.startswith("/v2") else b"image/png"
    early = raw_exchange(shipped, b"POST %s HTTP/1.1\r\nHost: x\r\ncontent-type: %s\r\nexpect: 100-continue\r\n"
                                  b"content-length: 8000000\r\n\r\n" % (path.encode(), media), wait_s=10)
    with shipped.client() as client:
        late = client.post(path, content=png(24, 24, "RGB"), headers={"content-type": media.decode()})
    assert early.startswith(b"HTTP/1.1 422") and late.status_code == 422, (early[:300], late.text)
    assert json.loads(early.split(b"\r\n\r\n", 1)[1]) == late.json()


def test_a_post_a_browser_sends_from_another_sites_page_is_refused_before_anything_runs(shipped):
    """A form post or a `no-cors` fetch needs no preflight: a probe's page on another origin started
    projection jobs through its visitor's browser (the visitor's own next one was then 429, its
    share taken), upscaled and ran v2 infers sent as text/plain. Browsers send `Origin` with each
    such request; one naming another site than the request's `Host` is refused before its body is
    read, and nothing runs. The server's own pages (an Origin naming its Host) and clients sending
    no Origin are served."""
    host = shipped.url.removeprefix("http://")
    jobs = shipped.metric("ganserve_requests_total", model="stylegan-shapes", operation="project")
    upscales = shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", operation="upscale")
    form = {"files": {"file": ("red.png", png(24, 24, "RGB"), "image/png")}}
    z = json.dumps({"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]})
    with shipped.client() as client:
        for origin in ("http://elsewhere.example", f"http://{host}.evil.example", "null", "http://[::1"):
            sent = {"headers": {"origin": origin}}
            for answer in (client.post("/v1/models/stylegan-shapes/project?steps=1", **form, **sent),
                           client.post("/v1/models/sr-rrdb-x4/upscale", **form, **sent),
                           client.post("/v2/models/dcgan-digits/infer", content=z, headers={"origin": origin, "content-type": "text/plain"})):
                assert answer.status_code == 403 and "another site" in str(answer.json()["error"]), (origin, answer.text)
        assert shipped.metric("ganserve_requests_total", model="stylegan-shapes", operation="project") == jobs  # none began
        assert shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", operation="upscale") == upscales
        own = client.post("/v1/models/sr-rrdb-x4/upscale", **form, headers={"origin": f"http://{host}"})
        assert own.status_code == 200, own.text
        assert client.post("/v2/models/dcgan-digits/infer", content=z, headers={"content-type": "text/plain"}).status_code == 200
        assert client.get("/v1/models", headers={"origin": "http://elsewhere.example"}).status_code == 200  # reads: CORS keeps them unread


@pytest.mark.parametrize("settings", [{}, {"workers": 2}], ids=["one process", "engine and two fronts"])
def test_a_server_given_its_host_names_answers_no_other_name(repository, settings):
    """DNS rebinding: a page on a name an attacker controls, whose address the attacker then points
    at this server, is same-site to itself: the site check lets its posts through, and it may read
    `/v1/models` and `/metrics`. With GANSERVE_ALLOWED_HOSTS set, a request (or a stream's
    handshake) sent to any other name is 421 before anything runs; addresses and localhost are
    answered, as every name is where the setting is empty."""
    with running_server(repository, allowed_hosts=["gan.example"], models=["digits", "upx4"], **settings) as server, server.client() as client:
        port = server.url.rsplit(":", 1)[1]
        for host in (f"gan.example:{port}", "GAN.Example", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "app.localhost"):
            assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
            assert client.post("/v1/models/digits/generate", json={"seed": 1}, headers={"host": host}).status_code == 200, host
        generated = server.metric("ganserve_requests_total", model="digits", operation="generate")
        for host in (f"evil.example:{port}", f"gan.example.evil.example:{port}", f"127.0.0.1:{port}.evil.example", "gan.example:x"):
            for method, path, sent in (("GET", "/v1/models", {}), ("GET", "/metrics", {}), ("GET", "/", {}),
                                       ("POST", "/v1/models/digits/generate", {"json": {"seed": 1}, "headers": {"origin": f"http://{host}"}})):
                answer = client.request(method, path, **sent | {"headers": sent.get("headers", {}) | {"host": host}})
                assert answer.status_code == 421 and "GANSERVE_ALLOWED_HOSTS" in answer.json()["error"]["message"], (host, path, answer.text[:200])
        assert server.metric("ganserve_requests_total", model="digits", operation="generate") == generated  # none ran
        handshake = (b"GET /v1/models/upx4/upscale/stream HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert raw_exchange(server, handshake % (b"evil.example", port.encode()), wait_s=5).startswith(b"HTTP/1.1 421")
        assert raw_exchange(server, handshake % (b"gan.example", port.encode()), wait_s=2).startswith(b"HTTP/1.1 101")


def test_origins_are_compared_by_scheme_host_and_port_and_trusted_ones_pass():
    from service.intake import cross_site_origin, trusted_origin_set

    def check(origin: str, host: str = "ganserve.example:8000", trusted: tuple[str, ...] = ()) -> str | None:
        return cross_site_origin({b"origin": origin.encode(), b"host": host.encode()}, trusted_origin_set(trusted))

    assert check("http://ganserve.example:8000") is None and check("HTTP://GanServe.Example:8000") is None
    assert check("http://ganserve.example") and check("http://ganserve.example:8001") and check("http://evil.example:8000")
    assert check("https://app.example", trusted=("https://App.example/",)) is None
    assert check("https://app.example:8443", trusted=("https://app.example",))  # another port is another origin
    assert check("null") and check("http://[::1") and check("http://ganserve.example:8000", host="")
    assert check("") == ""  # (an empty Origin is no origin of this server's either)


def test_an_upload_that_expects_100_continue_is_told_to_go_on_and_served(shipped):
    """The header checks refuse nothing they should not: an upscale sent after `Expect: 100-continue`
    (of its version, as JPEG by `format=` whatever `Accept` says) is told to go on, then served."""
    body = png(24, 24, "RGB")
    host, port = shipped.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/models/sr-rrdb-x4/upscale?version=1&format=jpeg HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                     b"expect: 100-continue\r\naccept: text/html\r\nconnection: close\r\ncontent-length: %d\r\n\r\n" % len(body))
        interim = sock.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100"), interim[:200]
        sock.sendall(body)
        answer = read_until_closed(sock, 30)
    assert answer.startswith(b"HTTP/1.1 200") and b"image/jpeg" in answer, answer[:300]


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: identity\r\n\r\n{}",
    b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
    b"transfer-encoding: chunked, chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
], ids=["identity", "chunked twice", "header without a colon"])
def test_a_request_the_http_parser_refuses_gets_the_api_json_400(shipped, request_bytes):
    """The parser's refusals were uvicorn's plain-text 400: a client reading every error as the
    API's JSON broke on them. A v2 path's is v2's error, a message (it was v1's object)."""
    answer = raw_exchange(shipped, request_bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), answer[:300]
    error = json.loads(body)["error"]
    if b" /v2/" in request_bytes.split(b"\r\n")[0]:
        assert isinstance(error, str) and "not valid HTTP/1.1" in error, error
    else:
        assert error["code"] == "bad_request"


def test_a_client_that_resets_with_requests_pipelined_costs_no_traceback(shipped):
    """uvicorn marked only the newest request of a lost connection gone: the one running ahead of
    those pipelined behind it wrote to the closed transport, and each reset connection logged two
    tracebacks (~7 KB; a re-probe's churn wrote 15 MB of them)."""
    before = shipped.process.log_path.read_text(errors="replace").count("Traceback")
    body = b'{"seed": 1, "n": 64}'
    request = b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    host, port = shipped.url.removeprefix("http://").split(":")
    for _ in range(10):
        sock = socket.create_connection((host, int(port)))
        sock.sendall(request * 3)
        time.sleep(0.01)  # the first one running
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, with the answers still to come
        time.sleep(0.05)
    time.sleep(2)
    log = shipped.process.log_path.read_text(errors="replace")
    assert log.count("Traceback") == before and "unable to perform operation" not in log, log[-3000:]
    with shipped.client() as client:
        assert client.post(f"{V1}/dcgan-digits/generate", json={"seed": 1}).status_code == 200


def test_headers_past_the_cap_get_431_before_the_parser_sees_the_rest(shipped):
    """httptools appends each piece of a header's value to a string: one 32 MiB header held the
    event loop 2.6 s, and a 406 echoed a 32 MiB Accept header back. Past 64 KiB (the default
    `max_header_bytes`) the connection is answered 431 and closed; a 32 KiB header is served."""
    host, port = shipped.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000)
        time.sleep(0.3)
        sock.sendall(b"a" * 200_000)  # the header is still going on
        answer = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431") and b"headers_too_large" in answer, answer[:200]
    with socket.create_connection((host, int(port)), timeout=5) as sock:  # 120 KB as 60 KB and the rest (once only the rest counted)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000)
        time.sleep(0.3)
        sock.sendall(b"a" * 60_000 + b"\r\n\r\n")
        answer = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    with shipped.client() as client:
        assert client.get("/health/live", headers={"X-Big": "a" * 32_768}).status_code == 200
        # whole in the request's first read (its count began after that read: 70-140 KB were served)
        assert client.get("/health/live", headers={"X-Big": "a" * 100_000}).status_code == 431
        assert client.post("/v1/models/dcgan-digits/generate", content=b"{" + b'"seed": 1, ' * 10_000 + b'"n": 1}',  # a body is no header
                           headers={"content-type": "application/json"}).status_code == 422
        refused = client.post("/v1/models/dcgan-digits/generate", json={"seed": 1}, headers={"Accept": "image/x-" + "a" * 30_000})
        assert refused.status_code == 406 and len(refused.content) < 1_000  # the message shows the header's start only


def test_trailers_after_a_chunked_body_are_dropped_and_past_the_header_cap_get_431(shipped):
    """Trailer fields after a chunked body were counted by no limit (neither the headers' nor the
    body's) and appended to the request's headers: a hostile probe's 400 MiB of them on an
    11-byte body were answered 200 and left the process 470 MB larger, each time. A few are
    dropped and the request served; past `max_header_bytes` (64 KiB), as many lines or one long
    line sent in pieces, the request gets 431 and its connection closes."""
    host, port = shipped.url.removeprefix("http://").split(":")
    body = b'{"seed": 1}'
    head = (b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n" % (len(body), body))
    served = raw_exchange(shipped, head + b"X-Checksum: abc\r\n\r\n", wait_s=3)
    assert served.startswith(b"HTTP/1.1 200") and b"image/png" in served[:500], served[:300]

    def trailers_in_pieces(pieces: list[bytes]) -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(head)
            for piece in pieces:
                sock.sendall(piece)
                time.sleep(0.05)  # (read as it comes: a close with bytes unread would reset the connection)
            return read_until_closed(sock, 5)

    many = trailers_in_pieces([b"".join(b"X-T%d-%d: %s\r\n" % (i, j, b"a" * 1000) for j in range(32)) for i in range(8)])
    long = trailers_in_pieces([b"X-Long: "] + [b"a" * 32_768] * 8)
    for answer in (many, long):
        assert answer.startswith(b"HTTP/1.1 431") and b"headers_too_large" in answer and b"trailer fields" in answer, answer[:300]
    with shipped.client() as client:
        assert client.post(f"{V1}/dcgan-digits/generate", json={"seed": 1}).status_code == 200


def test_a_client_still_sending_a_body_refused_mid_way_reads_its_413(shipped):
    """A chunked upload past `max_body_bytes` is refused once the limit is passed, with the client
    still sending: uvicorn closed the connection at once, and the client's next write failed
    (broken pipe) or the 413 was lost to a reset. Our side shuts after the answer and reads on for
    a second, so the client finishes its writes and reads the 413."""
    host, port = shipped.url.removeprefix("http://").split(":")
    piece = b"a" * 2**20
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/models/cyclegan-thin2thick/translate HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for _ in range(10):  # 10 MiB, past the 8 MiB limit
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            time.sleep(0.05)
        answer = read_until_closed(sock, 5)
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer, answer[:300]


def test_malformed_requests_in_a_flood_get_400_each_and_one_log_line_between_them(shipped):
    """uvicorn logs `Invalid HTTP request received.` for every malformed request: a hostile probe
    wrote 495,000 of them (20 MB) to the operator's log in a few minutes. Each still gets its 400;
    the log gets at most one such line every 10 s, the next saying how many were left out."""
    log_path = shipped.process.log_path
    before = log_path.read_text(errors="replace").count("Invalid HTTP request received.")
    answers = [raw_exchange(shipped, b"GET /health/live HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", wait_s=2) for _ in range(40)]
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers), {answer[:40] for answer in answers}
    time.sleep(0.3)
    assert log_path.read_text(errors="replace").count("Invalid HTTP request received.") - before <= 1
    with shipped.client() as client:
        assert client.get("/health/live").status_code == 200


def exif_bomb_jpeg(tags: int = 2000) -> bytes:
    """A small JPEG whose EXIF block lists `tags` distinct tags, each claiming data past the end of
    the file: Pillow warns once per tag."""
    plain = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 30, 200)).save(plain, "JPEG")
    entries = b"".join(struct.pack("<HHLL", 1000 + i, 7, 0x7FFFFFF0, 0) for i in range(tags))
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<LH", 8, tags) + entries + struct.pack("<L", 0)
    return plain.getvalue()[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + plain.getvalue()[2:]


def test_malformed_multipart_bodies_and_an_upload_of_bad_exif_tags_write_next_to_nothing_to_the_log(shipped):
    """python-multipart logged a warning per malformed body (500 lines in 1.8 s from one client),
    and Pillow warned to stderr once per bad EXIF tag of an upload (one 60 KB JPEG: 10,000 raw
    lines). Each request is answered as before; the log gets at most one multipart line per 10 s
    and none of Pillow's."""
    log_path = shipped.process.log_path
    before = len(log_path.read_text(errors="replace").splitlines())
    with shipped.client(timeout=60) as client:
        for _ in range(30):
            response = client.post(f"{V1}/cyclegan-thin2thick/translate", content=b"x" * 200 + b"\r\n--XyZ--\r\n",
                                   headers={"content-type": "multipart/form-data; boundary=XyZ"})
            assert response.status_code == 422
        response = client.post(f"{V1}/cyclegan-thin2thick/translate", content=exif_bomb_jpeg(), headers={"content-type": "image/jpeg"})  # (sr-rrdb-x4's 200s are counted by another test)
        assert response.status_code == 200
    time.sleep(0.3)
    added = log_path.read_text(errors="replace").splitlines()[before:]
    assert sum("python_multipart" in line or "boundary" in line for line in added) <= 1, added[:5]
    assert not any("Tag data" in line or "UserWarning" in line for line in added), added[:5]


def test_the_line_after_a_quiet_spell_says_how_many_client_warnings_were_left_out():
    now = [0.0]
    quiet = ClientCausedWarnings(every_s=10, clock=lambda: now[0])

    def passes(message: str, level: int = logging.WARNING, logger: str = "uvicorn.error") -> logging.LogRecord | None:
        record = logging.LogRecord(logger, level, __file__, 1, message, None, None)
        return record if quiet.filter(record) else None

    multipart = "python_multipart.multipart"  # every warning of it is about a client's body, its text formatted with the client's bytes
    assert passes("Expected boundary character 45, got 120 at index 2", logger=multipart) is not None
    assert passes("Expected boundary character 45, got 121 at index 2", logger=multipart) is None

    assert passes("Invalid HTTP request received.").getMessage() == "Invalid HTTP request received."
    assert [passes("Invalid HTTP request received.") for _ in range(5)] == [None] * 5
    assert passes("Unsupported upgrade request.") is not None  # counted apart
    assert passes("Exception in ASGI application", logging.ERROR) is not None  # everything else passes
    now[0] = 12.0
    assert passes("Invalid HTTP request received.").getMessage().startswith("Invalid HTTP request received. (5 more like it in the last 12 s")
    assert passes("Invalid HTTP request received.") is None


def test_pipelined_requests_past_the_cap_are_dropped_and_the_connection_closes_after_the_queued_answers(shipped):
    """uvicorn queued pipelined requests without bound (and the server read on while they were
    queued): 64-byte GETs cost ~2.8 KB each, 40 MB of them took the server up 1.8 GB, and parsing
    them starved every client. Past 64 queued behind the running one, the rest are dropped and
    the connection closes once the queued ones are answered; fewer are all answered."""
    host, port = shipped.url.removeprefix("http://").split(":")
    get = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(get * 10)  # within the cap: every one answered, and the connection stays open
        answers = b""
        while answers.count(b'{"live":true}') < 10:  # whole answers, bodies included
            answers += sock.recv(65536)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n")
        assert read_until_closed(sock, 10).startswith(b"HTTP/1.1 200")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(get * 5000)
        started = time.monotonic()
        answers = read_until_closed(sock, 10)
        closed_after_s = time.monotonic() - started
    assert answers.count(b"HTTP/1.1 200") == 65 and closed_after_s < 5, (answers.count(b"HTTP/1.1 200"), closed_after_s)
    with shipped.client() as client:
        assert client.get("/health/ready").status_code == 200


@pytest.mark.parametrize("split", ["after the request line", "inside the blank line"])
def test_an_upload_whose_headers_end_in_a_read_with_its_body_is_served(shipped, split):
    """The header cap counted every byte of a read while headers were incomplete, body included:
    an upload whose request line came in one read and the rest of its headers with 190 KB of body
    in the next (a client writing its headers in pieces, or the network splitting them) got 431."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, format="PNG")
    body = buffer.getvalue()
    assert len(body) > 128 * 1024  # random pixels do not compress: over twice the 64 KiB cap
    request = (f"POST {V1}/cyclegan-thin2thick/translate HTTP/1.1\r\nHost: x\r\ncontent-type: image/png\r\n"
               f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
    at = request.index(b"\r\n") + 2 if split == "after the request line" else request.index(b"\r\n\r\n") + 3
    host, port = shipped.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request[:at])
        time.sleep(0.3)
        sock.sendall(request[at:])
        answer = read_until_closed(sock, 30)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_empty_lines_after_an_answer_do_not_keep_a_connection_open(shipped):
    """uvicorn stops its keep-alive timer on any byte, and httptools skips the empty lines between
    requests without beginning one: a single "\\r\\n" after an answer kept the connection open
    for good (a hostile probe held one over 60 s; keep-alive is 5 s, the header timeout 1 s here)."""
    host, port = shipped.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while b'{"live":true}' not in answer:
            answer += sock.recv(65536)
        started = time.monotonic()
        sock.sendall(b"\r\n")
        rest = read_until_closed(sock, 8)
        assert time.monotonic() - started < 6, "the connection was still open"
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408")


def test_half_sent_requests_are_closed_after_the_header_and_body_timeouts(shipped):
    host, port = shipped.url.removeprefix("http://").split(":")
    stalled = []
    for i in range(50):
        sock = socket.create_connection((host, int(port)))
        if i % 2:
            sock.sendall(b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        else:
            sock.sendall(b"POST /v1/models/dcgan-digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        stalled.append(sock)
    time.sleep(4.5)  # header timeout 1 s, body timeout 3 s
    answers = []
    for sock in stalled:
        answers.append(read_until_closed(sock, 2).split(b"\r\n", 1)[0])
        sock.close()
    assert all(answer.startswith(b"HTTP/1.1 408") for answer in answers), set(answers)
    with shipped.client() as client:
        assert client.get("/health/ready").status_code == 200


def test_every_refusal_is_counted_under_its_status(shipped):
    before = shipped.metric("ganserve_requests_total", model="dcgan-digits", operation="generate", status="422")
    unknown = shipped.metric("ganserve_requests_total", model="unknown", status="404")
    with shipped.client() as client:
        client.post(f"{V1}/dcgan-digits/generate", json={"n": 10**25})
        client.post(f"{V1}/nope-{time.time()}/generate", json={})
    assert shipped.metric("ganserve_requests_total", model="dcgan-digits", operation="generate", status="422") == before + 1
    assert shipped.metric("ganserve_requests_total", model="unknown", status="404") == unknown + 1


def test_a_client_that_hangs_up_is_counted_as_499_not_200(shipped):
    before = shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", status="499")
    served = shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", status="200")  # (other tests' upscales on this server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{shipped.url}{V1}/sr-rrdb-x4/upscale", content=png(200, 200, "RGB"), headers=PNG, timeout=0.3)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", status="499") == before:
        time.sleep(0.2)
    assert shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", status="499") == before + 1
    assert shipped.metric("ganserve_requests_total", model="sr-rrdb-x4", status="200") == served


def test_the_model_listing_states_each_models_limits(shipped):
    with shipped.client() as client:
        models = {m["name"]: m for m in client.get(f"{V1}").json()["models"]}
    sr, cyclegan = models["sr-rrdb-x4"]["limits"], models["cyclegan-thin2thick"]["limits"]
    assert 0 < sr["max_input_pixels"] < 1024 * 1024 and sr["max_tiles"] >= 1
    assert 0 < cyclegan["max_input_pixels"] < 4096 * 4096
    assert models["sr-rrdb-x4"]["costs"]["model"]["seconds_per_unit"] > 0
    # a v2 whole image through the tile graph counts more per pixel the larger it is (on a CPU); translate's fit spans sizes
    assert models["sr-rrdb-x4"]["costs"]["model"]["large_item_exponent"] > 1 == models["cyclegan-thin2thick"]["costs"]["model"]["large_item_exponent"]
    for generator in ("dcgan-digits", "stylegan-shapes"):  # the most images a request's compute fits (clients found it by 413s)
        assert 1 <= models[generator]["limits"]["max_images"] <= 256
    assert "max_images" not in sr


def test_at_the_connection_cap_a_waiting_connection_makes_room_and_busy_ones_get_a_readable_503(repository):
    """Connections that sent nothing held every slot until their header timeout (one client at ~61
    connects/s kept 512 of them, and 97 % of other clients were refused); at the cap, one that
    has waited a second for a request is closed for the newcomer. Where every connection is busy
    with a request, the newcomer gets the JSON 503 — readable: closed with its request unread, the
    kernel reset the connection and clients saw ECONNRESET instead."""
    with running_server(repository, max_connections=4, header_timeout_s=30, body_timeout_s=30, models=["digits"]) as server:
        host, port = server.url.removeprefix("http://").split(":")
        busy = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            for sock in busy:  # a request whose body is still to come: being served
                sock.sendall(b"POST /v1/models/digits/generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n{")
            time.sleep(0.2)
            answer = raw_exchange(server, b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer[:200]
            # one address held every slot with bodies that never came, for the body timeout (a hostile
            # probe: every other client got 503 for 30 s at a time): once a body has been arriving
            # for a second, the one that has taken longest is answered 503 and its slot goes to
            # the newcomer of another address
            time.sleep(1.5)
            with socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0), timeout=5) as other:
                other.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_until_closed(other, 5).startswith(b"HTTP/1.1 200")
            given_up = [read_until_closed(sock, 0.5) for sock in busy]
            assert sorted(answer[:12] for answer in given_up) == [b"", b"", b"", b"HTTP/1.1 503"], given_up
            (refused,) = [answer for answer in given_up if answer]
            assert b"its connection went to a newcomer" in refused and b"retry-after: 1" in refused.lower()
        finally:
            for sock in busy:
                sock.close()
        time.sleep(0.3)
        idle = [socket.create_connection((host, int(port))) for _ in range(4)]
        try:
            time.sleep(1.5)  # past IDLE_EVICTABLE_S
            assert httpx.get(f"{server.url}/health/live").status_code == 200
            closed = 0
            for sock in idle:
                sock.settimeout(0.5)
                with contextlib.suppress(TimeoutError):
                    closed += sock.recv(1) == b""
            assert closed == 1  # the one that made room
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        # one client address re-opening connections as fast as they are closed keeps them all
        # under a second old: one of its waiting connections makes room for another address
        hog = [socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0)) for _ in range(4)]
        try:
            time.sleep(0.2)
            assert httpx.get(f"{server.url}/health/live").status_code == 200
            hog.append(socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0)))  # back to the cap
            time.sleep(0.2)
            # a client sharing the hog's address (behind NAT or a proxy every client does) is
            # served too: a newcomer takes the place of its own address's longest-waiting
            # connection, so the hog gains no slot by re-opening (92-96 % of such a client's
            # requests got 503 in a probe, where the newcomer of the busiest address was refused)
            with socket.create_connection((host, int(port)), source_address=("127.0.0.2", 0), timeout=5) as more:
                more.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_until_closed(more, 5).startswith(b"HTTP/1.1 200")
            assert [still_open(sock) for sock in hog] == [False, False, True, True, True]  # the oldest two made room
        finally:
            for sock in hog:
                sock.close()
        time.sleep(0.3)
        # an address whose clients do not keep up with their answers (a re-probe read 100 KB/s of pipelined
        # 1.5 MB answers on every connection: accepted requests, which nothing took and the send timeout,
        # which needs no progress at all, never cut) gives up the one furthest behind to a lighter address
        slow = []
        for _ in range(4):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.bind(("127.0.0.2", 0))
            sock.connect((host, int(port)))
            sock.sendall(b"GET /docs-assets/swagger-ui-bundle.js HTTP/1.1\r\nHost: x\r\n\r\n" * 8)  # more than the kernel's buffers take
            slow.append(sock)
        try:
            time.sleep(0.5)
            with socket.create_connection((host, int(port)), source_address=("127.0.0.3", 0), timeout=5) as other:
                other.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_until_closed(other, 5).startswith(b"HTTP/1.1 200")
            assert sum(not still_open_while_reading(sock) for sock in slow) == 1
        finally:
            for sock in slow:
                sock.close()


def test_a_v2_number_past_what_a_float_holds_is_named_as_out_of_range(shipped):
    """An integer of 310 to 4,300 digits was 'the data must be FP32 numbers' (it is a number), and
    one past FP32's range (1e39) printed numpy's overflow warning raw to stderr."""
    with shipped.client() as client:
        for huge in (10**400, 10**39):
            body = {"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [huge] + [0.0] * 63}]}
            response = client.post("/v2/models/dcgan-digits/infer", content=json.dumps(body), headers={"content-type": "application/json"})
            assert response.status_code == 422 and "range" in response.json()["error"], response.text
