"""The benchmark tools measure the real server and the bare runtime."""
import pytest

from bench.ceiling import measure_ceiling
from bench.load import run_load
from service.repository import scan_repository


def test_load_generator_reports_throughput_latency_and_the_servers_batch_size(server):
    result = run_load(server.url, "digits", "smoke", {"seed": 1}, concurrency=8, duration_s=1.0)
    assert result.ok > 0 and result.requests_per_s > 0
    assert set(result.statuses) == {"200"}
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99"]
    assert result.mean_batch_items >= 1.0
    assert result.stage_ms["compute"] > 0


def test_a_multi_image_requests_queue_figure_is_an_items_wait_not_the_sum_of_its_items_waits(server):
    """The queue histogram is observed once per item: divided by requests, a 64-image request on
    the H100 read 109 ms of queue inside a 12 ms request. An item's mean wait is a wall time."""
    result = run_load(server.url, "digits", "16 a request", {"seed": 1, "n": 16}, concurrency=4, duration_s=1.0)
    assert result.ok > 0
    assert 0 <= result.item_queue_ms <= result.stage_ms["request"]
    assert result.item_queue_ms == 0 or result.stage_ms["queue"] > result.item_queue_ms  # the old figure: 16 waits summed


def test_interleaved_turns_add_up_to_one_result_per_server(server):
    """`ganserve bench` takes its servers in turns (A B A B): each result sums its own turns,
    every request the server counted and no other's."""
    from bench.load import run_interleaved, scrape, target

    ours = target(server.url, "digits", "ours", {"seed": 1}, pid=server.process.pid)
    twice = target(server.url, "cdigits", "other model", {"seed": 1})
    before = scrape(server.url).get("ganserve_request_duration_seconds_count", 0.0)
    first, second = run_interleaved([ours, twice], concurrency=2, duration_s=1.0, rounds=2)
    counted = scrape(server.url)["ganserve_request_duration_seconds_count"] - before
    assert first.scenario == "ours" and second.scenario == "other model"
    assert 0.9 < first.duration_s < 1.5 and 0.9 < second.duration_s < 1.5  # two turns of 0.5 s each
    untimed = 2 * 2 * 2  # every turn's two connections each send one request before the clock starts
    assert first.ok + second.ok + untimed == counted and first.ok > 0 and second.ok > 0
    assert first.server_cpu_ms_per_request > 0 and second.server_cpu_ms_per_request == 0.0


def test_ceiling_times_the_same_runtime_at_each_batch_size(repository):
    entry = [e for e in scan_repository(repository) if e.name == "digits"][0]
    results = measure_ceiling(entry, "onnx", "cpu", 1, [1, 8], seconds=0.2)
    assert [r.batch_size for r in results] == [1, 8]
    assert all(r.forward_images_per_s >= r.forward_encode_images_per_s > 0 for r in results)
    # a many-image request's host work after the forward: its grid and the grid's JPEG, timed apart
    assert results[0].grid_ms is None and results[1].grid_ms > 0 and results[1].grid_jpeg_ms > 0


def test_a_random_style_entry_is_written_like_an_import_and_its_ceiling_is_timed(tmp_path):
    """bench/style_entry.py (the GPU script's 256² StyleGAN2; 8² here): an entry the server's
    runtimes load, marked as random, whose synthesis graph the ceiling can time (it takes ws, not z)."""
    from bench.style_entry import random_style_entry

    random_style_entry(tmp_path, resolution=8)
    (entry,) = scan_repository(tmp_path)
    assert entry.kind == "style" and entry.spec["source"]["format"] == "random" and entry.spec["resolution"] == 8
    (result,) = measure_ceiling(entry, "torchscript", "cpu", 1, [2], seconds=0.1)
    assert result.forward_images_per_s > 0


def test_the_soak_reports_statuses_latency_and_memory_of_the_shipped_models(tmp_path):
    from bench.soak import run_soak
    from tests.service.test_hostile import SHIPPED

    report = run_soak(SHIPPED, concurrency=6, duration_s=6, isolation_s=2, warmup_s=1, out=tmp_path / "soak.json",
                      stalled_readers=3, stalled_send_timeout_s=2, connection_hogs=256, hog_seconds=2, hog_max_connections=128)
    assert report["process_alive"] and report["errors"] == 0
    stalled = report["stalled_readers"]  # three ~9 MB answers, unread: held in the budget until their clients are dropped
    assert stalled["statuses"] == {"200": 3} and stalled["held_mb"] > 3 * 4 and stalled["released"] and stalled["process_alive"]
    hostile = report["operations"]["hostile"]["statuses"]
    assert hostile and all(status.startswith("4") for status in hostile)
    assert report["operations"]["dcgan generate"]["statuses"].get("200", 0) > 0
    assert report["isolation"]["p99_ratio"] > 0 and report["rss_end_mb"] > 100
    hogs = report["connection_hogs"]  # twice the cap in silent sockets: the benign client is served wherever the hog sits
    assert hogs["process_alive"] and set(hogs["phases"]) == {"same_address", "other_address"}
    for phase in hogs["phases"].values():
        assert phase["benign"]["served"] >= 0.9 and phase["hog_connects_per_s"] > 256 / 2, phase


def test_the_naive_baseline_answers_the_servers_pixels_and_both_report_cpu_per_request(server, repository):
    import io

    import httpx
    import numpy as np
    from PIL import Image

    from bench.server import launched_naive

    with launched_naive(repository, "digits", 1) as (process, url):
        naive = httpx.post(f"{url}/v1/models/digits/generate", json={"seed": 5}, timeout=30)
        baseline = run_load(url, "digits", "naive", {"seed": 1}, concurrency=2, duration_s=0.5, pid=process.pid, metrics=False)
    ours = httpx.post(f"{server.url}/v1/models/digits/generate", json={"seed": 5}, timeout=30)
    assert naive.status_code == ours.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(naive.content))), np.asarray(Image.open(io.BytesIO(ours.content))))
    assert set(baseline.statuses) == {"200"} and baseline.server_cpu_ms_per_request > 0
    measured = run_load(server.url, "digits", "smoke", {"seed": 1}, concurrency=2, duration_s=0.5, pid=server.process.pid)
    assert measured.server_cpu_ms_per_request > 0
    # by part: one process's event loop (HTTP, batching) apart from its other threads (the lane's forward pass)
    assert set(measured.server_cpu_ms_by_part) == {"event loop", "other threads"} and measured.server_cpu_ms_by_part["event loop"] > 0
    assert abs(sum(measured.server_cpu_ms_by_part.values()) - measured.server_cpu_ms_per_request) < 1e-6


def test_the_upscale_bench_measures_requests_one_stream_and_the_bare_forward(repository, tmp_path):
    from bench.upscale import run_upscale_bench

    # max_batch_size 4: the bare forward is timed at 1 and 4 tiles per batch (16 x 96 px tiles cost ~10 s here)
    report = run_upscale_bench(repository, "upx4", "onnx", [2], 1.0, 32, "jpeg", 4, 1, tmp_path / "upscale.json", measure_s=0.3)
    (load,) = report["load"]
    assert set(load["statuses"]) == {"200"} and load["requests_per_s"] > 0 and load["server_cpu_ms_per_request"] > 0
    assert report["stream"]["frames"] >= 1 and report["stream"]["frames_per_s"] > 0 and report["stream"]["server_stats"]["answered"] >= 1
    assert all(row["frames_per_s"] > 0 for row in report["forward"]) and report["encode_ms"]["jpeg"] > 0
    assert len(report["assembly_ms"]) == 4 and all(ms > 0 for ms in report["assembly_ms"].values())  # cutting, and three ways of assembling
    assert report["precision"] == "fp32"  # what the server says it serves (auto on a CPU), and what the bare forward ran in
    translate = run_upscale_bench(repository, "edges", "onnx", [1], 1.0, 32, "png", 16, 1, None, measure_s=0.3)
    assert set(translate["load"][0]["statuses"]) == {"200"} and translate["stream"] is None


def test_a_server_from_another_checkout_is_what_baseline_code_measures(repository, tmp_path):
    """`ganserve bench --baseline-code DIR` serves DIR's code, not this checkout's: a copy whose app
    says another version answers with it (and generates like this one)."""
    import shutil

    import httpx

    from bench.server import REPO, launched_server

    copy = tmp_path / "checkout"
    for package in ("bench", "ganserve", "models", "repository", "service", "training"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "ganserve_cli.py", copy)
    app_module = copy / "service" / "app.py"
    app_module.write_text(app_module.read_text().replace('title="ganserve", version="1.0"', 'title="ganserve", version="baseline-copy"'))
    with launched_server(repository, code=copy, log_level="warning") as (_, url):
        version = httpx.get(f"{url}/openapi.json", timeout=30).json()["info"]["version"]
        answer = httpx.post(f"{url}/v1/models/digits/generate", json={"seed": 5}, timeout=30)
    assert version == "baseline-copy" and answer.status_code == 200


def test_the_fairness_bench_reports_the_benign_clients_latency_and_queue_wait_beside_the_hogs(server):
    from bench.fairness import run_fairness

    result = run_fairness(server.url, "digits", hog_images=16, duration_s=2.5)
    assert result.benign_requests >= 5 and result.hog_requests >= 2
    assert 0 <= result.queue_p50_ms <= result.benign_p50_ms <= result.benign_p99_ms


def test_the_contention_bench_counts_what_each_model_was_answered_beside_the_others(tmp_path):
    """`ganserve bench-contention` on the shipped models, a busy loop beside: every answer of both
    scenarios counted by status, with the share of admitted requests that missed their deadline,
    and in the streams scenario each answered upscale's compute over what admission counted."""
    from bench.contention import run_contention_bench
    from tests.service.test_hostile import SHIPPED

    report = run_contention_bench(SHIPPED, None, rounds=1, bursts=1, k=2, seconds=3.0, timeout_s=3.0, upscale_side=64,
                                  translate_side=256, out=tmp_path / "contention.json", other_processes=1, streams=2)
    assert report["other_processes"] == 1
    cases = report["results"]["this checkout"][0]
    assert set(cases) == {"bursts/sr-rrdb-x4", "bursts/cyclegan-thin2thick", "steady/sr-rrdb-x4", "steady/cyclegan-thin2thick", "steady/dcgan-digits",
                          "streams/sr-rrdb-x4", "streams/cyclegan-thin2thick"}
    assert sum(cases["bursts/sr-rrdb-x4"]["statuses"].values()) == 2 and sum(cases["bursts/cyclegan-thin2thick"]["statuses"].values()) == 2
    assert cases["steady/dcgan-digits"]["statuses"].get(200, 0) >= 5  # one every 200 ms beside the heavy clients
    assert cases["streams/cyclegan-thin2thick"]["statuses"].get(200, 0) >= 5 and cases["streams/sr-rrdb-x4"]["statuses"]
    counted = cases["streams/sr-rrdb-x4"]["compute_over_counted"]
    assert len(counted) == cases["streams/sr-rrdb-x4"]["statuses"].get(200, 0) and all(ratio > 0 for ratio in counted)
    for figures in cases.values():
        assert set(figures["statuses"]) <= {200, 503, 504}
        assert figures["admitted_past_deadline"] is None or 0 <= figures["admitted_past_deadline"] <= 1
    assert (tmp_path / "contention.json").exists()


@pytest.mark.quiet_host  # it times one model twice and bounds the ratio: another worker's tests would load one timing
def test_the_warmup_bench_sets_each_starts_warm_up_against_the_idle_servers_timing(tmp_path):
    """`ganserve bench-warmup`: a start's warm-up figure and what its idle re-measure timed."""
    from bench.warmup import run_warmup_bench
    from tests.service.test_hostile import SHIPPED

    report = run_warmup_bench(SHIPPED, "sr-rrdb-x4", 1, [1], None, 0.5, 60.0, tmp_path / "warmup.json", intra_op_threads=1)
    (row,) = report["servers"]
    (start,) = row["starts"]
    assert row["server"] == "this code, workers 1" and (tmp_path / "warmup.json").exists()
    assert start["s_per_unit_warmup"] > 0 and start["s_per_unit_idle"] > 0 and start["side_warmup"] and start["side_idle"]
    assert 0.3 < start["warmup_over_idle"] < 5, start  # the same model timed twice on a quiet machine


def test_the_image_compute_bench_sets_this_codes_upscales_and_stream_beside_another_checkouts(tmp_path):
    """`ganserve bench-image-compute` (small cases: this checkout against itself)."""
    from bench.image_compute import run_image_compute_bench
    from bench.server import REPO
    from tests.service.test_hostile import SHIPPED

    report = run_image_compute_bench(SHIPPED, REPO, 1, 2, 1.0, tmp_path / "compute.json", threads=1,
                                     request_cases=(("sr-rrdb-x4", "upscale", 48),), stream_case=("sr-rrdb-x4", 32))
    memory, upscale, stream = report["rows"]
    assert memory["case"] == "resident MiB" and memory["ready_now"] > 100 and memory["after_baseline"] > 100
    assert upscale["case"] == "sr-rrdb-x4 upscale 48²" and len(upscale["compute_now_all_s"]) == len(upscale["compute_baseline_all_s"]) == 2
    assert upscale["compute_now_s"] > 0 and 0.2 < upscale["speedup"] < 5  # the same code twice
    assert stream["case"] == "sr-rrdb-x4 stream 32²" and stream["frames_per_s_now"] > 0 and stream["p50_ms_baseline"] > 0
    assert (tmp_path / "compute.json").exists()


def test_the_claims_bench_counts_each_clients_answers_and_how_full_the_room_was(tmp_path):
    """`ganserve bench-claims` (one short scenario, this code only)."""
    from bench.claims import run_claims_bench
    from tests.service.test_hostile import SHIPPED

    report = run_claims_bench(SHIPPED, None, ["squat_one"], 3.0, 400 * 2**20, tmp_path / "claims.json")
    (row,) = report["rows"]
    assert row["scenario"] == "squat_one" and row["code"] == "this code" and row["side"] > 0 and 300 < row["room_mib"] < 500
    assert row["answered_per_min"]["benign"] > 0 and set(row["statuses"]) >= {"benign", "victim", "attacker"}
    assert 0 <= row["room_used"] <= 1.5 and (tmp_path / "claims.json").exists()


def test_the_animation_bench_times_the_servers_encoding_beside_pillows_defaults(tmp_path):
    from bench.animation import run_animation_bench

    report = run_animation_bench([32], 3, 24, 1, tmp_path / "animation.json")
    assert [(row["frames"], row["side"], row["format"]) for row in report["rows"]] == [
        ("photo", 32, "gif"), ("photo", 32, "webp"), ("noise", 24, "gif"), ("noise", 24, "webp")]
    for row in report["rows"]:
        assert row["now_ms_per_frame"] > 0 and row["before_ms_per_frame"] > 0 and row["now_bytes"] > 0
        if row["frames"] == "photo":
            assert row["now_psnr_db"] > 25  # (32² frames: ~30 dB; 256² and up: 35-41 dB)
        if row["format"] == "webp":  # it was lossless
            assert row["before_psnr_db"] > 100
    assert (tmp_path / "animation.json").exists()


def test_the_projection_churn_bench_times_a_benign_client_alone_and_beside_the_churners(server):
    """`python -m bench.projection_churn` (a short turn on the test server)."""
    from bench.projection_churn import run_projection_churn

    report = run_projection_churn(server.url, "styles", "upx4", "digits", side=512, seconds=1.5)
    alone, beside = report["phases"]["alone"], report["phases"]["beside the churn"]
    assert alone["projections"] == {"accepted": 0, "refused": 0} and beside["projections"]["accepted"] > 0
    for phase in (alone, beside):
        assert phase["upscale"]["n"] > 0 and 0 < phase["generate"]["p50_ms"] <= phase["generate"]["max_ms"]
        assert set(phase["statuses"]) == {"upscale 200", "generate 200"}, phase["statuses"]


def test_a_bench_option_that_is_no_list_of_counts_or_names_a_missing_model_is_a_usage_error(repository):
    """`--concurrency 1,abc` ended in a traceback, `--concurrency 0` one after every server had
    started, `bench-limits --models nosuch` one after a server failed to become ready."""
    import typer
    from typer.testing import CliRunner

    from bench.cli import register

    app = typer.Typer()
    register(app)
    for arguments in (["bench", "--concurrency", "1,abc"], ["bench", "--concurrency", "0"], ["bench-encoding", "--sides", "0"],
                      ["bench-limits", "--models", "nosuch", "--repository", str(repository)]):
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2 and "Invalid value" in result.output and "Traceback" not in result.output, (arguments, result.output)


@pytest.mark.parametrize("dataset", ["image_folder", "cifar10"])
def test_the_data_bench_reads_a_set_as_training_does_and_reports_its_cost(tmp_path, dataset):
    from bench.data_loading import run_data_loading_bench

    report = run_data_loading_bench(images=20, resolution=16, baseline_code=None, out=tmp_path / "report.json", dataset=dataset)
    result = report["results"]["now"]
    assert result["images"] == 20 and result["tensor_bytes"] == 20 * 3 * 16 * 16 and result["peak_rss_bytes"] > result["tensor_bytes"]
    assert (tmp_path / "report.json").exists()


def test_the_estimates_bench_sets_each_images_compute_beside_what_admission_counted_and_learns_its_size(tmp_path):
    from bench.estimates import run_estimates_bench
    from tests.service.test_hostile import SHIPPED

    report = run_estimates_bench(SHIPPED, "sr-rrdb-x4", [96, 192], 1, tmp_path / "estimates.json")
    tile, whole = report["rows"]
    assert (tile["units"], whole["units"]) == (1.0, 4.0)
    assert all(row["observed_s"] > 0 and row["estimate_s"] > 0 for row in report["rows"])
    # a 192² image (four tiles' pixels) met the prior; it taught its size class a factor, and the tile class none
    assert report["cost"]["large_item_exponent"] > 1 and report["cost"]["size_factors"] == {}
    assert list(report["cost_after"]["size_factors"]) == ["4"] and (tmp_path / "estimates.json").exists()


def test_the_png_settings_bench_times_the_served_png_beside_the_settings_before():
    from bench.encoding import png_settings_rows

    rows = png_settings_rows([64], repeats=1)  # every file is decoded back to its pixels inside
    assert [row["picture"] for row in rows] == ["photo 64²", "shapes 512²", "grey photo 512²", "noise 256²"]
    for row in rows:
        assert min(row["before_ms"], row["now_ms"], row["pillow_ms"]) > 0 and row["speedup"] == row["before_ms"] / row["now_ms"]
        assert 0.5 < row["size_ratio"] < 2  # the same pictures, losslessly: neither setting doubles a file


def test_the_startup_bench_times_launch_to_ready_and_the_cpu_spent(repository, tmp_path):
    from bench.startup import run_startup_bench

    report = run_startup_bench(repository, starts=1, workers=[1], baseline_code=None, out=tmp_path / "startup.json")
    (row,) = report["servers"]
    (start,) = row["starts"]
    assert row["server"] == "this code, workers 1" and start["ready_s"] > 0 and start["cpu_s"] > 1  # the imports alone take seconds
    assert (tmp_path / "startup.json").exists()
