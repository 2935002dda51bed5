"""Style-model endpoints through the real server: truncation, style mixing, interpolation,
editing, their bad input, and that different kinds of requests share synthesis batches."""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from bench.animation import decoded, psnr


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def generate(client, **body):
    return client.post("/v1/models/styles/generate", json={"format": "npy", **body})


def test_style_model_spec_lists_layers_directions_and_both_graphs(server):
    with server.client() as client:
        spec = client.get("/v1/models/styles").json()["versions"][0]["spec"]
    assert spec["kind"] == "style" and spec["num_ws"] == 6 and spec["w_dim"] == 8
    assert set(spec["directions"]) == {"size", "hue"}
    assert set(spec["layer_ranges"]) == {"coarse", "middle", "fine"}
    assert spec["mapping"]["formats"]["onnx"]["parity_max_abs_error"] <= 1e-4
    assert spec["formats"]["onnx"]["parity_max_abs_error"] <= 1e-4


def test_same_seed_and_psi_give_the_same_image_and_psi_zero_gives_the_average_for_every_seed(server):
    with server.client() as client:
        a = npy(generate(client, seeds=[3], truncation_psi=0.7))
        b = npy(generate(client, seeds=[9, 3], truncation_psi=0.7))
        average = npy(generate(client, seeds=[1, 2], truncation_psi=0.0))
        plain = npy(generate(client, seeds=[1, 2]))
    assert np.array_equal(a[0], b[1])
    assert np.array_equal(average[0], average[1])
    assert not np.array_equal(plain[0], plain[1])


def test_truncation_cutoff_pulls_only_the_first_layers_toward_the_average(server):
    with server.client() as client:
        everywhere = npy(generate(client, seeds=[1, 2], truncation_psi=0.0, truncation_cutoff=6))
        average = npy(generate(client, seeds=[1, 2], truncation_psi=0.0))
        coarse_only = npy(generate(client, seeds=[1, 2], truncation_psi=0.0, truncation_cutoff=2))
        plain = npy(generate(client, seeds=[1, 2]))
    assert np.array_equal(everywhere, average)  # a cutoff at num_ws is plain truncation
    assert not np.array_equal(coarse_only[0], coarse_only[1])  # the fine layers keep each seed's style
    assert not np.array_equal(coarse_only[0], plain[0]) and not np.array_equal(coarse_only[0], average[0])


def test_style_mix_grid_has_a_cell_per_pair_and_mixing_no_layers_changes_nothing(server):
    with server.client() as client:
        grid = npy(client.post("/v1/models/styles/style-mix", json={"row_seeds": [1, 2], "col_seeds": [5, 6, 7], "layers": "coarse", "format": "npy"}))
        rows = npy(generate(client, seeds=[1, 2]))
        all_b = npy(client.post("/v1/models/styles/style-mix", json={"row_seeds": [1], "col_seeds": [5], "layers": [0, 1, 2, 3, 4, 5], "format": "npy"}))
        b = npy(generate(client, seeds=[5]))
    assert grid.shape == (6, 16, 16, 3)
    assert not np.array_equal(grid[0], rows[0])  # row 1 took column 5's coarse styles
    assert np.array_equal(all_b[0], b[0])  # every layer from B is B


def test_interpolation_returns_an_animation_or_frames_whose_ends_are_the_seeds(server):
    with server.client() as client:
        gif = client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 5})
        frames = npy(client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 5, "format": "npy", "space": "z"}))
        ends = npy(generate(client, seeds=[1, 2]))
        webp = client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 3, "format": "webp"})
        webp_frames = npy(client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 3, "format": "npy"}))
        gif_frames = npy(client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 5, "format": "npy"}))
        accepted = client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 3}, headers={"accept": "image/webp"})
        refused = client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 3}, headers={"accept": "image/jpeg"})
        timed = client.post("/v1/models/styles/interpolate", json={"seeds": [1, 2], "steps": 3, "frame_ms": 40}, headers={"accept": "image/png, image/gif"})
    assert gif.headers["content-type"] == "image/gif"
    assert timed.headers["content-type"] == "image/gif"  # a frame time asks for an animation: Accept chooses among those
    assert accepted.headers["content-type"] == "image/webp" and refused.status_code == 406  # Accept counts, as on every other route (a GIF came back)
    assert Image.open(io.BytesIO(gif.content)).n_frames == 5
    assert Image.open(io.BytesIO(webp.content)).n_frames == 3
    # what the animations hold stays close to the frames: the GIF's 256 colours a frame (a fast octree quantiser), the WebP at quality 90
    assert psnr(decoded(webp.content), webp_frames) > 30
    assert psnr(decoded(gif.content), gif_frames) > 30
    assert frames.shape == (5, 16, 16, 3)
    assert np.abs(frames[0].astype(int) - ends[0]).max() <= 1 and np.abs(frames[-1].astype(int) - ends[1]).max() <= 1


def test_edit_strength_zero_is_the_original_image(server):
    with server.client() as client:
        edited = npy(client.post("/v1/models/styles/edit", json={"seed": 4, "direction": "size", "strengths": [-2, 0, 2], "format": "npy"}))
        original = npy(generate(client, seeds=[4]))
    assert edited.shape == (3, 16, 16, 3)
    assert np.array_equal(edited[1], original[0])
    assert not np.array_equal(edited[0], edited[2])


def test_edited_mixed_and_interpolated_images_are_not_labelled_as_seeds(server):
    """Edit of seed 9 answered `X-Seeds: 0,1,2` and a list of `{"seed": 0}`, …: the strengths'
    indices, sent as seeds. Their items are `index`ed; generate's stay seeds."""
    with server.client() as client:
        edited = client.post("/v1/models/styles/edit", json={"seed": 9, "direction": "size", "strengths": [-1, 0, 1], "layout": "list"})
        mixed = client.post("/v1/models/styles/style-mix", json={"row_seeds": [9, 8], "col_seeds": [7], "layout": "list"})
        generated = client.post("/v1/models/styles/generate", json={"seeds": [9, 8], "layout": "list"})
    for answer, count in ((edited, 3), (mixed, 2)):
        assert answer.status_code == 200 and "x-seeds" not in answer.headers, answer.headers
        assert [item["index"] for item in answer.json()["images"]] == list(range(count)) and "seed" not in answer.json()["images"][0]
    assert generated.headers["x-seeds"] == "9,8" and [item["seed"] for item in generated.json()["images"]] == [9, 8]


def test_edit_strengths_are_in_standard_deviations_of_w_along_the_direction_unless_asked_for_w_units(server):
    """The model lists each direction's spread over its W; a strength of 1 in the default units is
    one spread, so the same image as that spread in raw W units."""
    with server.client() as client:
        spreads = client.get("/v1/models/styles").json()["versions"][0]["direction_spreads"]
        in_sigma = npy(client.post("/v1/models/styles/edit", json={"seed": 4, "direction": "size", "strengths": [1.5], "format": "npy"}))
        in_w = npy(client.post("/v1/models/styles/edit", json={"seed": 4, "direction": "size", "strengths": [1.5 * spreads["size"]], "units": "w", "format": "npy"}))
        unscaled = npy(client.post("/v1/models/styles/edit", json={"seed": 4, "direction": "size", "strengths": [1.5], "units": "w", "format": "npy"}))
    assert set(spreads) == {"size", "hue"} and all(0 < value < 100 for value in spreads.values())
    assert np.array_equal(in_sigma, in_w)
    assert not np.array_equal(in_sigma, unscaled)


@pytest.mark.parametrize("path,body,mentions", [
    ("edit", {"seed": 1, "direction": "smile"}, "unknown direction"),
    ("style-mix", {"row_seeds": [1], "col_seeds": [2], "layers": [0, 7]}, "layer indices"),
    ("style-mix", {"row_seeds": [1], "col_seeds": [2], "layers": [0, 99]}, "layers"),
    ("style-mix", {"row_seeds": [1], "col_seeds": [2], "layers": "toes"}, "'coarse', 'middle' or 'fine'"),
    ("interpolate", {"seeds": [1, 2], "steps": 10_000}, "steps"),
    ("interpolate", {"seeds": [1]}, "seeds"),
    ("interpolate", {"w": [[0.0] * 8, [0.0] * 7]}, "w must be"),
    ("edit", {"seed": 1, "direction": "size", "strengths": [1e9]}, "strengths"),
    ("edit", {"seed": 1, "direction": "size", "units": "pixels"}, "units"),
    ("generate", {"seed": 1, "truncation_psi": 5}, "truncation_psi"),
    ("generate", {"seed": 1, "truncation_psi": 0.5, "truncation_cutoff": 7}, "exceeds the model's 6 layers"),
    ("generate", {"seed": 1, "truncation": 0.5}, "no BigGAN truncation"),
    # options that act on nothing in the request: refused, not silently ignored (a hostile probe)
    ("generate", {"seed": 1, "truncation_cutoff": 2}, "give truncation_psi too"),
    ("interpolate", {"seeds": [1, 2], "format": "png", "frame_ms": 40}, "frame_ms times an animation"),
    ("interpolate", {"seeds": [1, 2], "format": "npy", "frame_ms": 40}, "frame_ms times an animation"),
    # options that act on seeds, sent with a given w: refused, not silently ignored
    ("edit", {"w": [0.0] * 8, "direction": "size", "truncation_psi": 0.5}, "truncation_psi applies to seeds, not to a given w"),
    ("interpolate", {"w": [[0.0] * 8, [0.1] * 8], "truncation_psi": 0.7, "class": 1}, "truncation_psi and class apply to seeds"),
])
def test_bad_style_requests_are_422_with_a_reason(server, path, body, mentions):
    with server.client() as client:
        response = client.post(f"/v1/models/styles/{path}", json=body)
    assert response.status_code == 422
    assert mentions in response.json()["error"]["message"]


def test_style_operations_on_a_non_style_model_are_422(server):
    with server.client() as client:
        assert client.post("/v1/models/digits/style-mix", json={"row_seeds": [1], "col_seeds": [2]}).status_code == 422
        assert client.post("/v1/models/digits/generate", json={"truncation_psi": 0.5}).status_code == 422


def test_generate_edit_and_interpolate_requests_share_synthesis_batches(server):
    calls = [("generate", {"seeds": [i], "format": "npy"}) for i in range(12)]
    calls += [("edit", {"seed": i, "direction": "hue", "strengths": [1.0], "format": "npy"}) for i in range(12)]
    calls += [("interpolate", {"seeds": [i, i + 1], "steps": 2, "format": "npy"}) for i in range(12)]
    with server.client() as client:
        before_batches = server.metric("ganserve_batch_items_count", model="styles", operation="synthesis")
        with ThreadPoolExecutor(36) as pool:
            responses = list(pool.map(lambda call: client.post(f"/v1/models/styles/{call[0]}", json=call[1]), calls))
        assert all(r.status_code == 200 for r in responses)
        batches = server.metric("ganserve_batch_items_count", model="styles", operation="synthesis") - before_batches
    assert batches < 36  # 36 requests, 60 synthesis items, fewer forward passes than requests
