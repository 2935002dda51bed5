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


MICROS = 1_000_000


class EncoderBacklog:
    def __init__(self, threads: int) -> None:
        self.threads = threads
        # one thread's microseconds of the encodings admitted and not yet done: whole numbers, so
        # what is added and taken off in any order comes back to exactly 0 (float sums left 1e-16,
        # and a `> 0` alert on the gauge on for good)
        self.micros = 0

    @property
    def seconds(self) -> float:
        return self.micros / MICROS

    def wait_s(self) -> float:
        """How long an encoding admitted now waits for the pool (every thread busy with the backlog)."""
        return self.seconds / self.threads

    def check(self, encode_s: float, idle_compute_s: float, compute_s: float, remaining_s: float, timeout_s: float, fmt_hint: str = "",
              slow_retry_s: int | None = None) -> None:
        """Refuses an answer that could not be encoded before the deadline: 413 where, after its
        compute on an idle lane (`idle_compute_s`), its encoding alone would pass a whole request
        timeout; 503 where its compute behind its lane's queue (`compute_s`), the encodings
        admitted before it and its own would pass what is left of its deadline. Retry-After: when
        enough of the queued encodings are done; where they are not the reason (its compute and
        encoding alone pass the deadline), `slow_retry_s` where the model has run slower than
        measured lately (admission's idle re-measure), else when the lane's queue has gone."""
        if encode_s <= 0:
            return
        if idle_compute_s + encode_s > timeout_s:
            raise ApiError(413, f"this request's images take about {encode_s:.1f} s to encode{fmt_hint} after {idle_compute_s:.1f} s of compute; "
                                f"a request has {timeout_s:.0f} s here: ask for fewer or smaller images, or jpeg or npy", code="too_expensive")
        wait = self.wait_s()
        excess = compute_s + wait + encode_s - remaining_s
        if excess <= 0:
            return
        if compute_s + encode_s <= remaining_s:  # the encodings queued before it are the reason
            retry = max(1, math.ceil(excess))
            why = f"the encoder pool has about {wait:.1f} s of encoding queued"
        else:
            retry = slow_retry_s or max(1, math.ceil(excess))
            why = (f"this request needs about {compute_s:.1f} s of compute{' (its model has run slower than measured lately)' if slow_retry_s else ''}"
                   f" and {encode_s:.1f} s of encoding, and its deadline leaves {remaining_s:.1f} s")
        raise ApiError(503, f"{why}; this request's answer would be encoded after its deadline: retry in {retry} s", code="overloaded",
                       headers={"Retry-After": str(retry)})

    def add(self, seconds: float) -> int:
        """Counts `seconds`; answers the microseconds counted, which `remove_micros` takes off."""
        micros = round(seconds * MICROS)
        self.micros += micros
        return micros

    def remove_micros(self, micros: int) -> None:
        self.micros = max(0, self.micros - micros)
