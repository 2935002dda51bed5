"""Shared test settings and fixtures: torch on the machine's two cores, a real model repository,
and the real server."""
import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import of onnxruntime (models/onnx_runtime.py says why)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.serving import build_repository, running_server  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="session")
def server(repository):
    """One server for every module that needs the default settings: starting one costs ~7 s (the
    imports of a fresh process) and no test changes its state (metrics are read as differences;
    tests that need other settings, or that load and unload models, start their own)."""
    with running_server(repository, max_batch_size=16, max_queue_delay_ms=5) as running:
        yield running
