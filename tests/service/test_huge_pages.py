"""Transparent huge pages for the buffers glibc maps (service/memory.py `huge_pages_environment`):
the image-to-image graphs map their activations afresh every run (no arena), and faulting them in
4 KiB at a time took cyclegan's 1024² translate from 0.45 to 0.68 s of compute (median,
`ganserve bench-hugepages`). Opt-in: GANSERVE_HUGE_PAGES=true."""
from __future__ import annotations

from pathlib import Path

import pytest

from service.memory import HUGE_PAGES_TUNABLE, THP_MODE, huge_pages_environment
from tests.service.test_hostile import SHIPPED
from tests.serving import running_server


def thp(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / "enabled"
    path.write_text({"always": "[always] madvise never\n", "madvise": "always [madvise] never\n", "never": "always madvise [never]\n"}[mode])
    return path


def test_the_server_asks_for_huge_pages_where_the_kernel_gives_them_keeping_other_tunables(tmp_path):
    assert huge_pages_environment({"PATH": "/bin"}, thp(tmp_path, "madvise")) == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    kept = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp(tmp_path, "always"))
    assert kept == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    assert huge_pages_environment({}, thp(tmp_path, "never")) is None  # nothing to ask for: no restart
    assert huge_pages_environment({}, tmp_path / "missing") is None  # not Linux
    assert huge_pages_environment({"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}, thp(tmp_path, "madvise")) is None  # already: no loop


def environment_of(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(pair.decode(errors="replace").split("=", 1) for pair in pairs if b"=" in pair)


@pytest.mark.skipif(huge_pages_environment({}) is None, reason=f"the kernel gives no transparent huge pages here ({THP_MODE})")
@pytest.mark.parametrize("huge_pages", [True, None])
def test_the_server_runs_with_huge_pages_where_asked_to(huge_pages):
    """With GANSERVE_HUGE_PAGES=true `ganserve serve` restarts itself in the environment (same
    pid: a process manager sees one process) and serves; by default it does not."""
    settings = {"huge_pages": True} if huge_pages else {}
    with running_server(SHIPPED, models=["dcgan-digits"], **settings) as server, server.client() as client:
        answered = client.post("/v1/models/dcgan-digits/generate", json={"seed": 1})
        tunables = environment_of(server.process.pid).get("GLIBC_TUNABLES", "")
    assert answered.status_code == 200
    assert (HUGE_PAGES_TUNABLE in tunables) == bool(huge_pages), tunables
