"""ONNX Runtime, imported with its telemetry off.

Since 1.29 the official Linux wheels send usage events to Microsoft (1DS): a device identifier and
a SQLite cache under `~/.cache/Microsoft/DeveloperTools/.onnxruntime`, and threads that resolve
`mobile.events.data.microsoft.com` every few seconds (seen with strace on a serving process). A
server holding its users' models sends nothing anywhere unless its operator says so, and an
offline one has no business resolving names. `ORT_DISABLE_TELEMETRY=1` turns all of it off, but
only where it is set before the first import (measured: set after it, the lookups go on); an
operator who wants the events sets it to 0 and it is left as they set it."""
from __future__ import annotations

import os
from types import ModuleType

TELEMETRY_SWITCH = "ORT_DISABLE_TELEMETRY"


def onnx_runtime() -> ModuleType:
    """The `onnxruntime` module; every import of it in the project goes through here (tests set
    the same switch in their conftest, before their own imports)."""
    os.environ.setdefault(TELEMETRY_SWITCH, "1")
    import onnxruntime

    return onnxruntime
