"""The encoder pool's backlog: seconds of encoding admitted in this process and not yet done.

A request's images are encoded after its compute, in the process's encoder pool, which every
model shares. Its cost is estimated at admission from the rates measured at start-up
(`EncoderTable.seconds`) and counted here until its encoding is done (or the request ends
without it), so admission knows before a request is queued whether its answer can be encoded
before its deadline, behind the encoding already admitted: 1024² answers take 0.06–0.12 s an
image as PNG, 4–8 s for 64 of them, where the compute on a GPU is a fraction of that. Mutated on
the event loop only (admission and the end of a request's encoding), like a lane's backlog.
"""
from __future__ import annotations

import math

from service.errors import ApiError


class EncoderBacklog:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.seconds = 0.0  # one thread's seconds of the encodings admitted and not yet done

    def wait_s(self) -> float:
        """How long an encoding admitted now waits for the pool (every thread busy with the backlog)."""
        return self.seconds / self.threads

    def check(self, encode_s: float, idle_compute_s: float, compute_s: float, remaining_s: float, timeout_s: float, fmt_hint: str = "") -> None:
        """Refuses an answer that could not be encoded before the deadline: 413 where, after its
        compute on an idle lane (`idle_compute_s`), its encoding alone would pass a whole request
        timeout; 503 where its compute behind its lane's queue (`compute_s`), the encodings
        admitted before it and its own would pass what is left of its deadline (Retry-After: when
        enough of them are done)."""
        if encode_s <= 0:
            return
        if idle_compute_s + encode_s > timeout_s:
            raise ApiError(413, f"this request's images take about {encode_s:.1f} s to encode{fmt_hint} after {idle_compute_s:.1f} s of compute; "
                                f"a request has {timeout_s:.0f} s here: ask for fewer or smaller images, or jpeg or npy", code="too_expensive")
        wait = self.wait_s()
        if compute_s + wait + encode_s > remaining_s:
            retry = max(1, math.ceil(compute_s + wait + encode_s - remaining_s))
            raise ApiError(503, f"the encoder pool has about {wait:.1f} s of encoding queued; this request's answer would be encoded "
                                f"after its deadline: retry in {retry} s", code="overloaded", headers={"Retry-After": str(retry)})

    def add(self, seconds: float) -> None:
        self.seconds += seconds

    def remove(self, seconds: float) -> None:
        self.seconds = max(0.0, self.seconds - seconds)
