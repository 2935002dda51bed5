"""Generation through the real server: formats, layouts, determinism under batching."""
import base64
import io
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def decode(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)))


def test_one_seed_returns_one_png_of_the_model_resolution(server):
    with server.client() as client:
        response = client.post("/v1/models/digits/generate", json={"seed": 7})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).shape == (32, 32)
    assert response.headers["x-seeds"] == "7"


def test_a_seed_gives_the_same_image_alone_and_inside_a_concurrent_burst(server):
    with server.client() as client:
        alone = decode(client.post("/v1/models/digits/generate", json={"seed": 123}).content)
        batches_before = server.metric("ganserve_batch_items_count", model="digits", operation="generate")
        items_before = server.metric("ganserve_batch_items_sum", model="digits", operation="generate")
        seeds = list(range(100, 148))
        with ThreadPoolExecutor(48) as pool:
            responses = list(pool.map(lambda s: client.post("/v1/models/digits/generate", json={"seed": s}), seeds))
    assert all(r.status_code == 200 for r in responses)
    assert np.array_equal(decode(responses[seeds.index(123)].content), alone)
    batches = server.metric("ganserve_batch_items_count", model="digits", operation="generate") - batches_before
    items = server.metric("ganserve_batch_items_sum", model="digits", operation="generate") - items_before
    assert items == 48
    assert batches < 48  # some forward passes carried more than one request's image


def test_a_model_operation_reports_its_stages_in_server_timing(server):
    with server.client() as client:
        response = client.post("/v1/models/digits/generate", json={"seed": 3, "n": 4})
        error = client.post("/v1/models/digits/generate", json={"seed": -1})
    stages = {part.split(";")[0].strip(): float(part.split("dur=")[1]) for part in response.headers["server-timing"].split(",")}
    assert set(stages) == {"estimate", "queue", "compute", "encode", "total"}
    assert all(value >= 0 for value in stages.values()) and stages["total"] >= stages["compute"] + stages["encode"]
    assert stages["estimate"] > 0  # the compute admission counted for it
    assert "total;dur=" in error.headers["server-timing"]  # refused before any work: only the total


def test_different_seeds_give_different_images(server):
    with server.client() as client:
        a = decode(client.post("/v1/models/digits/generate", json={"seed": 1}).content)
        b = decode(client.post("/v1/models/digits/generate", json={"seed": 2}).content)
    assert not np.array_equal(a, b)


def test_a_grid_never_has_more_columns_than_images(server):
    """`columns` is a client's number: 1024 columns for two images must not size a 1024-wide canvas."""
    with server.client() as client:
        grid = client.post("/v1/models/digits/generate", json={"seed": 5, "n": 2, "columns": 1024})
    assert grid.status_code == 200 and decode(grid.content).shape[:2] == (36, 70)


def test_several_images_come_back_as_a_grid_a_base64_list_or_an_npy_stack(server):
    with server.client() as client:
        grid = client.post("/v1/models/digits/generate", json={"seed": 5, "n": 4, "columns": 2})
        listed = client.post("/v1/models/digits/generate", json={"seeds": [5, 6, 7, 8], "layout": "list"})
        stack = client.post("/v1/models/digits/generate", json={"seed": 5, "n": 4, "format": "npy"})
    assert decode(grid.content).shape[:2] == (70, 70)
    images = json.loads(listed.content)["images"]
    assert [i["seed"] for i in images] == [5, 6, 7, 8]
    array = np.load(io.BytesIO(stack.content))
    assert array.shape == (4, 32, 32, 1) and array.dtype == np.uint8
    # the same seed is the same image whichever way it is delivered
    assert np.array_equal(decode(base64.b64decode(images[0]["data"])), array[0, :, :, 0])
    with server.client() as client:
        # a list is a list for one image too (a client parsing the list got the PNG itself), and columns,
        # which lays out a grid, is refused where there is none (both were silently ignored)
        one = client.post("/v1/models/digits/generate", json={"seeds": [5], "layout": "list"})
        assert one.headers["content-type"] == "application/json" and [i["seed"] for i in one.json()["images"]] == [5]
        for body in ({"n": 4, "layout": "list", "columns": 2}, {"n": 4, "format": "npy", "columns": 2}):
            refused = client.post("/v1/models/digits/generate", json=body)
            assert refused.status_code == 422 and "columns lays out a grid" in refused.json()["error"]["message"], body
        refused = client.post("/v1/models/digits/generate", json={"n": 4, "format": "npy", "layout": "list"})
        assert refused.status_code == 422 and "one uint8 stack" in refused.json()["error"]["message"]


def test_accept_header_chooses_jpeg_or_webp(server):
    with server.client() as client:
        jpeg = client.post("/v1/models/digits/generate", json={"seed": 1}, headers={"accept": "image/jpeg"})
        webp = client.post("/v1/models/digits/generate", json={"seed": 1, "format": "webp"})
    assert jpeg.headers["content-type"] == "image/jpeg" and jpeg.content[:2] == b"\xff\xd8"
    assert webp.headers["content-type"] == "image/webp" and webp.content[8:12] == b"WEBP"


def test_conditional_model_takes_a_class_by_index_or_name(server):
    with server.client() as client:
        by_index = client.post("/v1/models/cdigits/generate", json={"seed": 3, "class": 7})
        by_name = client.post("/v1/models/cdigits/generate", json={"seed": 3, "class": "7"})
        # the test model has trained two steps, so its classes differ by less than a grey level:
        # compare the raw tensors of the same latent under two classes
        body = {"inputs": [{"name": "z", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 128},
                           {"name": "label", "shape": [2], "datatype": "INT64", "data": [7, 2]}]}
        raw = client.post("/v2/models/cdigits/infer", json=body).json()["outputs"][0]["data"]
    assert by_index.status_code == by_name.status_code == 200
    assert np.array_equal(decode(by_index.content), decode(by_name.content))
    assert raw[: len(raw) // 2] != raw[len(raw) // 2 :]


def test_models_are_listed_with_their_spec(server):
    with server.client() as client:
        listing = client.get("/v1/models").json()["models"]
        detail = client.get("/v1/models/cdigits").json()
    assert {m["name"] for m in listing} == {"digits", "cdigits", "styles", "edges", "gray", "upx4"}
    assert {m["kind"] for m in listing} == {"unconditional", "conditional", "style", "translation", "super_resolution"}
    assert all(m["ready"] for m in listing)
    spec = detail["versions"][0]["spec"]
    assert spec["kind"] == "conditional" and spec["class_names"][7] == "7"
    assert spec["formats"]["onnx"]["parity_max_abs_error"] <= 1e-4


def test_a_models_sample_grid_is_served_and_404s_without_one(server):
    with server.client() as client:
        answer = client.get("/v1/models/digits/samples.png")
        missing = client.get("/v1/models/nope/samples.png")
        other_version = client.get("/v1/models/digits/samples.png", params={"version": 9})
        unknown = client.get("/v1/models/digits/samples.png", params={"size": 9})  # 422 as on every v1 route (it was a 200)
    assert unknown.status_code == 422 and "unknown query parameter 'size'" in unknown.json()["error"]["message"]
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    Image.open(io.BytesIO(answer.content)).verify()
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert other_version.status_code == 404


def test_playground_and_openapi_docs_are_served_with_every_script_from_the_server(server):
    """/docs and /redoc loaded Swagger UI and ReDoc from a CDN: blank pages on a host without the
    internet. Every script, style sheet and icon they name is now a path on this server."""
    with server.client() as client:
        assert "ganserve" in client.get("/").text
        assert "/v1/models/{name}/generate" in client.get("/openapi.json").json()["paths"]
        for page in ("/docs", "/redoc"):
            html = client.get(page)
            assert html.status_code == 200
            assets = re.findall(r"""(?:src|href)=["']([^"']+)["']|(?:url|swagger_js_url)\s*[:=]\s*["']([^"']+)["']""", html.text)
            urls = {a or b for a, b in assets} - {""}
            assert urls and not [u for u in urls if "//" in u], (page, urls)  # nothing from another host
            for url in urls:
                assert client.get(url).status_code == 200, url


def test_ganserve_sample_draws_the_images_the_server_gives_for_the_same_seeds(server, repository, tmp_path):
    """`ganserve sample --seed 5 --n 4` and the server's seeds 5…8: the same latents, so the same
    images (up to the runtime's float rounding, at most one level of 255)."""
    from service.imaging import to_uint8
    from training.run_eval import sample_run

    samples = sample_run(repository.parent / "dcgan", tmp_path / "grid.png", 4, 5, None, "last", 1.0)
    with server.client() as client:
        served = client.post("/v1/models/digits/generate", json={"seed": 5, "n": 4, "format": "npy"})
    assert served.status_code == 200 and (tmp_path / "grid.png").exists()
    drawn = to_uint8(samples.numpy(), (-1.0, 1.0)).astype(int)
    assert np.abs(drawn - np.load(io.BytesIO(served.content)).astype(int)).max() <= 1


def test_a_key_given_twice_in_a_json_body_is_422_naming_it(server):
    """The standard parser kept the last of two `seed`s without a word (a filter in front of the
    server may have read the first); a nested object's duplicate counts too (found while parsing,
    before the body's fields are looked at)."""
    with server.client() as client:
        for body in ('{"seed": 1, "seed": 2}', '{"seed": 1, "n": 2, "format": "png", "n": 3}'):
            answer = client.post("/v1/models/digits/generate", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 422, (body, answer.status_code)
            assert "appears more than once" in answer.json()["error"]["message"]
        nested = '{"seeds": [1, 2], "w": null, "weights": {"size": 1, "size": 2}}'
        answer = client.post("/v1/models/styles/generate", content=nested, headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "'size' appears more than once" in answer.json()["error"]["message"]
        assert client.post("/v1/models/digits/generate", content='{"seed": 1, "n": 2}', headers={"content-type": "application/json"}).status_code == 200


def test_accept_weights_rank_the_formats_and_a_weight_past_one_is_no_weight():
    """`image/webp;q=2` (or `q=1e400`) outranked every well-formed range; RFC 9110 weights run
    from 0 to 1 with three decimals at most, and a range with any other is left out."""
    from service.responses import accepted_media

    assert accepted_media("image/png;q=0.5, image/jpeg;q=0.9, image/webp") == ["image/webp", "image/jpeg", "image/png"]
    assert accepted_media("image/webp;q=2, image/png;q=0.1") == ["image/png"]
    assert accepted_media("image/webp;q=1e400, image/jpeg;q=nan, image/png;q=1.000") == ["image/png"]
    assert accepted_media("image/png;q=0, image/jpeg;q=0.001") == ["image/jpeg"]
