"""translate and upscale through the real server: round trips in each upload form and output
format, sizes restored, determinism, seams, limits, and tiles of different requests sharing a
batch."""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from service.imaging import jpeg_structure
from tests.serving import running_server


def encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    picture = Image.fromarray(array)
    (picture.convert(mode) if mode else picture).save(buffer, format=fmt)
    return buffer.getvalue()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def post_image(client, path: str, data: bytes, content_type: str = "image/png", **params):
    return client.post(path, content=data, headers={"content-type": content_type}, params=params)


def npy(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_translate_restores_the_input_size_and_is_deterministic(server):
    image = encoded(photo(45, 70))
    with server.client() as client:
        first = npy(post_image(client, "/v1/models/edges/translate", image, format="npy"))
        again = npy(post_image(client, "/v1/models/edges/translate", image, format="npy"))
        resized = npy(post_image(client, "/v1/models/edges/translate", image, format="npy", fit="resize"))
    assert first.shape == (1, 45, 70, 3) and resized.shape == (1, 45, 70, 3)
    assert np.array_equal(first, again)  # eval mode: no dropout, running batch-norm statistics


def test_translate_answers_in_the_format_of_the_accept_header_and_takes_multipart(server):
    with server.client() as client:
        response = client.post("/v1/models/edges/translate", files={"file": ("shape.webp", encoded(photo(32, 32), "WEBP"), "image/webp")},
                               headers={"accept": "image/jpeg"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)


@pytest.mark.parametrize("mode", ["L", "RGBA", "RGB"])
def test_gray_to_colour_takes_grey_alpha_and_colour_uploads_and_answers_in_colour(server, mode):
    with server.client() as client:
        out = npy(post_image(client, "/v1/models/gray/translate", encoded(photo(40, 64), mode=mode), format="npy"))
    assert out.shape == (1, 40, 64, 3)


def test_a_16_bit_grey_png_is_the_image_its_8_bit_version_is(server):
    """Pillow's convert clips 16-bit grey at 255 instead of scaling it: a 0-65535 gradient was
    upscaled as a picture 99.6 % white. Decoded as the top 8 bits, it is its 8-bit version."""
    grey16 = (np.random.default_rng(3).random((40, 48)) * 65535).astype(np.uint16)
    with server.client() as client:
        deep = npy(post_image(client, "/v1/models/upx4/upscale", encoded(grey16), format="npy"))
        shallow = npy(post_image(client, "/v1/models/upx4/upscale", encoded((grey16 >> 8).astype(np.uint8)), format="npy"))
    assert np.array_equal(deep, shallow)


@pytest.mark.parametrize("tag", [3, 6, 8, 5])
def test_a_photo_stored_sideways_with_an_exif_orientation_is_served_upright(server, tag):
    """Phones store a portrait photo sideways and tag it; what the user sees is the tagged
    orientation. The upload is upscaled and translated as that upright picture: the same pixels
    as the upright image sent without a tag, at its size (the tiles and the cost planned for it)."""
    from PIL import ImageOps

    stored = Image.fromarray(photo(30, 100, seed=tag))
    exif = Image.Exif()
    exif[0x0112] = tag
    tagged = io.BytesIO()
    stored.save(tagged, format="PNG", exif=exif.tobytes())
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged.getvalue()))))
    assert upright.shape[:2] == ((30, 100) if tag == 3 else (100, 30))
    with server.client() as client:
        for path, params in (("/v1/models/upx4/upscale", {}), ("/v1/models/edges/translate", {"fit": "pad"})):
            got = npy(post_image(client, path, tagged.getvalue(), format="npy", **params))
            want = npy(post_image(client, path, encoded(upright), format="npy", **params))
            assert np.array_equal(got, want), (path, got.shape, want.shape)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF")  # Pillow's, once per place in a server's log
def test_the_header_probe_sizes_a_tagged_jpeg_as_shown_and_a_broken_exif_block_is_ignored():
    from service.imaging import decode_upload, probe_upload

    exif = Image.Exif()
    exif[0x0112] = 6
    tagged, broken = io.BytesIO(), io.BytesIO()
    Image.fromarray(photo(20, 50)).save(tagged, format="JPEG", exif=exif.tobytes())
    Image.fromarray(photo(20, 50)).save(broken, format="JPEG", exif=b"Exif\x00\x00MM\x00*\xff\xff\xff\xff")
    assert probe_upload(tagged.getvalue()) == (20, 50) and decode_upload(tagged.getvalue(), 10**6).shape == (50, 20, 3)
    assert probe_upload(broken.getvalue()) == (50, 20) and decode_upload(broken.getvalue(), 10**6).shape == (20, 50, 3)


def many_scan_jpeg(side: int, scans: int, hidden: bool = False) -> bytes:
    """A valid progressive greyscale JPEG whose AC scans are empty (one end-of-band run over every
    block each): a few bytes a scan, a pass over the whole image to decode each."""
    import struct

    def segment(marker: int, payload: bytes) -> bytes:
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    def entropy(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)
        return b"".join(bytes([byte, 0]) if byte == 0xFF else bytes([byte]) for byte in (int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)))

    blocks = (side // 8) ** 2
    assert 16384 <= blocks < 32768  # one EOBRUN of 14 bits covers them all
    header = (b"\xff\xd8" + segment(0xDB, b"\x00" + bytes([1] * 64)) + segment(0xC2, struct.pack(">BHHB", 8, side, side, 1) + b"\x01\x11\x00")
              + segment(0xC4, b"\x00" + bytes([1, 1] + [0] * 14) + b"\x00\x01")  # DC: category 0 (code 0)
              + segment(0xC4, b"\x10" + bytes([1, 1] + [0] * 14) + b"\xe0\x00"))  # AC: EOB run of 2^14 + 14 bits (code 0)
    dc_scan = segment(0xDA, b"\x01\x01\x00\x00\x00\x00") + entropy("0" * blocks)
    ac_scan = segment(0xDA, b"\x01\x01\x00\x01\x3f\x00") + entropy("0" + format(blocks - 2**14, "014b"))
    if not hidden:
        return header + dc_scan + ac_scan * scans + b"\xff\xd9"
    # 0xFF 0xFF 0x00 and a "length" over a block of scans: libjpeg reads a fill byte and a stuffed
    # zero (garbage, skipped) and decodes every scan after it; the count once jumped over them all
    block = ac_scan * 500
    return header + dc_scan + (b"\xff\xff\x00" + struct.pack(">H", len(block) + 2) + block) * (scans // 500) + b"\xff\xd9"


@pytest.mark.parametrize("hidden", [False, True], ids=["in plain sight", "behind a stuffed zero read as a marker"])
def test_a_jpeg_of_endless_scans_is_refused_before_it_is_decoded(server, hidden):
    """Each scan of a progressive JPEG is a pass over every block: 10,000 scans of 4096² were a
    303 KB file and 13.4 s of a core no deadline could stop. Past 100 scans it is not decoded; a
    normal progressive JPEG (about 10 scans) is. The scans are counted as libjpeg finds them: a
    probe hid 20,000 behind bytes the count read as a marker with a length (25 s of a core)."""
    bomb, normal = many_scan_jpeg(1024, 2000, hidden), io.BytesIO()
    assert jpeg_structure(bomb, 10**6, 10**6)[1] == 2001  # every scan libjpeg decodes, counted
    assert Image.open(io.BytesIO(bomb)).size == (1024, 1024)  # a JPEG as far as its header goes
    Image.fromarray(photo(40, 48)).save(normal, "JPEG", progressive=True)
    with server.client() as client:
        refused = post_image(client, "/v1/models/edges/translate", bomb, "image/jpeg")
        served = post_image(client, "/v1/models/edges/translate", normal.getvalue(), "image/jpeg", format="npy")
    assert refused.status_code == 422 and "more than 100 scans" in refused.json()["error"]["message"]
    assert npy(served).shape == (1, 40, 48, 3)


def test_a_jpeg_padded_between_its_segments_is_refused_before_it_is_opened(server):
    """Pillow's header parser steps over fill bytes and garbage between segments one at a time:
    4 MB of 0xFF after the JFIF segment cost ~1 s to open, twice (probe, then decode). A few
    fill bytes, as the standard allows before any marker, are still read."""
    plain = io.BytesIO()
    Image.fromarray(photo(16, 16)).save(plain, "JPEG")
    jfif_end = 4 + int.from_bytes(plain.getvalue()[4:6], "big")
    padded, filled = (plain.getvalue()[:jfif_end] + filler + plain.getvalue()[jfif_end:] for filler in (b"\xff" * 4_000_000, b"\xff" * 8))
    with server.client() as client:
        refused = post_image(client, "/v1/models/edges/translate", padded, "image/jpeg")
        served = post_image(client, "/v1/models/edges/translate", filled, "image/jpeg", format="npy")
    assert refused.status_code == 422 and "4000000 bytes of padding or garbage" in refused.json()["error"]["message"], refused.text
    assert npy(served).shape == (1, 16, 16, 3)


def with_empty_segments(image: bytes, count: int) -> bytes:
    """`image` (a JPEG or a PNG) with `count` empty APP1 segments after the start of image, or
    empty private chunks after IHDR: still a valid file of the same pixels."""
    import struct
    import zlib

    if image.startswith(b"\xff\xd8"):
        return image[:2] + b"\xff\xe1\x00\x02" * count + image[2:]
    chunk = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    return image[:33] + chunk * count + image[33:]


def test_an_upload_of_endless_empty_segments_is_refused_before_it_is_opened(server):
    """Pillow walks a JPEG's marker segments and a PNG's chunks in Python: 8 MB of empty ones
    around a 32x32 image cost 4-5 s of a core to open and as much to decode, with 260 MB held and
    none of it in the request's cost (a hostile probe). Past 1,024 plus one per KiB of upload the
    file is not opened; a file with a few hundred (ICC, XMP, many IDAT chunks) is served."""
    picture = photo(32, 32)
    with server.client() as client:
        for fmt, media in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
            flood = with_empty_segments(encoded(picture, fmt), 300_000)  # ~1.2-3.6 MB
            refused = post_image(client, "/v1/models/edges/translate", flood, media)
            assert refused.status_code == 422, refused.text
            assert "segments" in refused.json()["error"]["message"] or "chunks" in refused.json()["error"]["message"]
            served = post_image(client, "/v1/models/edges/translate", with_empty_segments(encoded(picture, fmt), 300), media, format="npy")
            assert npy(served).shape == (1, 32, 32, 3)


def test_upscale_multiplies_the_size_by_the_scale_for_every_upload_form(server):
    image = photo(100, 150)  # 2 x 2 tiles of 96 px at 16 px overlap
    with server.client() as client:
        raw = npy(post_image(client, "/v1/models/upx4/upscale", encoded(image, "WEBP", "RGB"), "image/webp", format="npy"))
        multipart = client.post("/v1/models/upx4/upscale", files={"file": ("p.png", encoded(image), "image/png")}, params={"format": "jpeg"})
    assert raw.shape == (1, 400, 600, 3)
    assert multipart.status_code == 200 and Image.open(io.BytesIO(multipart.content)).size == (600, 400)
    assert multipart.headers["x-tiles"] == "4"


def test_tiling_leaves_no_seams(server, repository):
    """upx4's receptive field (~3 input px) fits in the blending margin (4 px), so the tiled
    upscale must equal one forward pass over the whole image, and a constant image must come back
    constant away from the image's own border."""
    import onnxruntime as ort

    image = photo(200, 200, seed=3)  # 3 x 3 tiles of 96 px at 16 px overlap
    flat = np.full((200, 200, 3), 120, dtype=np.uint8)
    with server.client() as client:
        tiled = post_image(client, "/v1/models/upx4/upscale", encoded(image), format="npy")
        flat_out = npy(post_image(client, "/v1/models/upx4/upscale", encoded(flat), format="npy"))[0].astype(int)
    assert tiled.headers["x-tiles"] == "9"
    session = ort.InferenceSession(str(repository / "upx4" / "1" / "model.onnx"))
    whole = session.run(None, {"image": (image.astype(np.float32) / 127.5 - 1).transpose(2, 0, 1)[None]})[0][0]
    reference = np.clip(np.rint((whole + 1) * 127.5), 0, 255).transpose(1, 2, 0)
    difference = np.abs(npy(tiled)[0].astype(int) - reference)
    # the bottom/right tiles reach past the image into mirrored pixels, where one pass sees zero
    # padding: those border rows differ by design; everywhere else, seams included, they agree
    assert difference[:-16, :-16].max() <= 1, np.argwhere(difference[:-16, :-16] > 1)[:5]
    interior = flat_out[16:-16, 16:-16].reshape(-1, 3)
    spread = interior.max(axis=0) - interior.min(axis=0)
    assert (spread <= 1).all(), f"constant input came back with per-channel spreads {spread}"


def test_bad_uploads_are_clear_4xx(server):
    with server.client() as client:
        garbage = post_image(client, "/v1/models/upx4/upscale", b"not an image")
        empty = post_image(client, "/v1/models/edges/translate", b"")
        wrong_type = post_image(client, "/v1/models/edges/translate", b"{}", "application/json")
        no_file = client.post("/v1/models/edges/translate", files={"other": ("x", b"1", "text/plain")})
        wrong_kind = post_image(client, "/v1/models/upx4/translate", encoded(photo(8, 8)))
        generate_on_translator = client.post("/v1/models/edges/generate", json={"n": 1})
        bad_format = post_image(client, "/v1/models/edges/translate", encoded(photo(8, 8)), format="bmp")
    assert garbage.status_code == 422 and "not a PNG" in garbage.json()["error"]["message"]
    assert empty.status_code == 422
    assert wrong_type.status_code == 415
    assert no_file.status_code == 422 and "file" in no_file.json()["error"]["message"]
    assert wrong_kind.status_code == 422 and "/v1/models/upx4/upscale" in wrong_kind.json()["error"]["message"]
    assert generate_on_translator.status_code == 422 and "/translate" in generate_on_translator.json()["error"]["message"]
    assert bad_format.status_code == 422


def test_v2_infer_checks_the_size_multiple(server):
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 20, 20], "data": [0.0] * 1200}]}
    with server.client() as client:
        response = client.post("/v2/models/edges/infer", json=body)
    assert response.status_code == 422 and "multiples of 32" in response.json()["error"]  # the protocol's error shape


@pytest.fixture(scope="module")
def slow_batching_server(repository):
    """Small limits, a long queue delay so concurrent requests' tiles meet in one batch, and tiles
    that meet without overlap (so they come back as uint8 and are placed, not blended)."""
    with running_server(repository, max_batch_size=64, max_queue_delay_ms=400, max_upload_pixels=200 * 200,
                        max_upscale_input_pixels=120 * 120, upscale_tile=32, upscale_overlap=0) as running:
        yield running


def test_tiles_without_overlap_are_converted_where_computed_and_placed_exactly(slow_batching_server, repository):
    """At overlap 0 each tile's output is converted to uint8 by the runtime (on a GPU: before it
    leaves the device) and copied into place: the pixels of float tiles blended and converted."""
    import onnxruntime as ort

    from service.imaging import to_uint8
    from service.uploads import to_model_input
    from service.tiling import blend_tiles, cut_tiles, plan_tiles

    image = photo(70, 45, seed=5)  # 3 x 2 tiles of 32 px, the last row and column mirror-padded
    with slow_batching_server.client() as client:
        response = post_image(client, "/v1/models/upx4/upscale", encoded(image), format="npy")
    assert response.headers["x-tiles"] == "6"
    session = ort.InferenceSession(str(repository / "upx4" / "1" / "model.onnx"))
    grid = plan_tiles(70, 45, 32, 0)
    outputs = [session.run(None, {"image": tile[None]})[0][0] for tile in cut_tiles(to_model_input(image, 3), grid)]
    reference = to_uint8(blend_tiles(outputs, grid, 4)[None], (-1.0, 1.0))
    served = npy(response)
    assert served.shape == reference.shape == (1, 280, 180, 3)
    assert np.abs(served.astype(int) - reference).max() <= 1


def test_upload_limits_answer_413(slow_batching_server):
    with slow_batching_server.client() as client:
        too_big = post_image(client, "/v1/models/edges/translate", encoded(photo(201, 200)))
        too_big_to_upscale = post_image(client, "/v1/models/upx4/upscale", encoded(photo(121, 120)))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]["message"]
    assert too_big_to_upscale.status_code == 413


def test_tiles_of_different_requests_share_a_batch(slow_batching_server):
    image = encoded(photo(40, 40))  # 4 tiles of 32 px

    def upscale(_):
        with slow_batching_server.client() as client:
            return post_image(client, "/v1/models/upx4/upscale", image, format="npy")

    with ThreadPoolExecutor(3) as pool:
        responses = list(pool.map(upscale, range(3)))
    assert all(r.status_code == 200 and r.headers["x-tiles"] == "4" for r in responses)
    labels = {"model": "upx4", "operation": "upscale"}
    batches = slow_batching_server.metric("ganserve_batch_items_count", **labels)
    at_most_one_request = slow_batching_server.metric("ganserve_batch_items_bucket", le="4.0", **labels)
    assert batches >= 1 and at_most_one_request < batches, "every batch held the tiles of one request only"
    outputs = [np.load(io.BytesIO(r.content)) for r in responses]
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])  # batch company never changes a result
