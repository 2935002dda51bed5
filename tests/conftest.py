"""Shared test settings and fixtures: torch on the machine's two cores, a real model repository,
and the real server.

`make test` runs the suite in two phases (Makefile): every test that can share the machine on two
pytest-xdist workers, then the `quiet_host` ones alone. Under xdist each test file runs whole on one
worker, tests/ray as one, and both phases share one built repository. Plain `pytest` runs everything in one process."""
import os
import shutil
from pathlib import Path

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import of onnxruntime (models/onnx_runtime.py says why)

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

from tests.serving import build_repository, running_server  # noqa: E402

torch.set_num_threads(2)


XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set in an xdist worker ("gw0", "gw1"), absent otherwise


@pytest.hookimpl(optionalhook=True)  # xdist's hook: plain `pytest` runs without xdist too
def pytest_xdist_make_scheduler(config, log):
    """Each test file whole on one worker (`--dist loadfile`: its module-scoped servers start once),
    and tests/ray as one unit (its Ray cluster is package-scoped: two at once would each take a
    core). Not `xdist_group` marks: `--dist loadgroup` ignores them under pytest 9.2
    (pytest-dev/pytest-xdist#1386)."""
    from xdist.scheduler import LoadFileScheduling

    class FileOrRayScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/ray" if path.startswith("tests/ray/") else path

    return FileOrRayScheduling(config, log)


@pytest.fixture(scope="session")
def repository(tmp_path_factory):
    """Built once where it can be shared (~50 s of both cores): by the xdist workers of one run
    (the first to get here builds it, the other waits: building it twice at once shares the same
    two cores), and by both of `make test`'s phases (the Makefile names a directory in
    `TESTS_SHARED_REPOSITORY` for the one run, and removes it after)."""
    shared = os.environ.get("TESTS_SHARED_REPOSITORY") or (XDIST_WORKER and tmp_path_factory.getbasetemp().parent)
    if not shared:
        return build_repository(tmp_path_factory.mktemp("serving"))
    root = Path(shared) / "serving"
    built = root / "built"
    with FileLock(f"{root}.lock"):
        if not built.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            built.write_text(str(build_repository(root)))
    return Path(built.read_text())


@pytest.fixture(scope="session")
def server(repository):
    """One server for every module that needs the default settings: starting one costs ~7 s (the
    imports of a fresh process) and no test changes its state (metrics are read as differences;
    tests that need other settings, or that load and unload models, start their own)."""
    with running_server(repository, max_batch_size=16, max_queue_delay_ms=5) as running:
        yield running
