"""Loaded by every Python process a test starts with this folder on PYTHONPATH and
GANSERVE_TEST_CYCLES_DIR set (a `--workers` server's supervisor, engine and fronts): the garbage
collector is turned off, and each time the file `count` in that folder changes, what only reference
cycles hold is collected and its count appended to `<pid>.txt` there
(tests/service/test_connection_memory.py reads them)."""
import gc
import os
import threading
import time
from pathlib import Path


def count_on_request(folder: Path) -> None:
    seen = None
    while True:
        time.sleep(0.1)
        try:
            stamp = (folder / "count").read_text()
        except OSError:
            continue
        if stamp == seen:
            continue
        seen = stamp
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable is kept in gc.garbage, to be counted
        gc.collect()
        found = len(gc.garbage)
        gc.garbage.clear()  # (cyclic: they stay unreachable, and the next collection finds them again)
        gc.set_debug(0)
        with open(folder / f"{os.getpid()}.txt", "a") as counts:
            counts.write(f"{stamp} {found}\n")


if folder := os.environ.get("GANSERVE_TEST_CYCLES_DIR"):
    gc.disable()
    threading.Thread(target=count_on_request, args=(Path(folder),), daemon=True).start()
