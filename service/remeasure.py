"""Timing the models again while the server is idle, so that limits derived at a busy warm-up relax.

A model's limits (the largest upload, the most compute one request may ask for: 413 past them)
and its compute estimate are fitted from the times its warm-up measured (service/costs.py). A
server that warmed while another process loaded the machine measured up to ~2x slow (a probe saw
0.51 against 1.22 s a tile for the same model) and refused, until it was restarted, requests it
could serve.

So once every lane has had nothing to do for `remeasure_idle_s`, no admitted request holds
memory and no job runs, the models' warmed shapes are timed again, one run at a time on each
model's own lane, and a fit is replaced where it is faster (`GraphCost.relax`). Never where it
is slower: contention can only slow a measurement, and a 413 must not move against a client who
was served before (a busier machine is admission's correction's business, answered with 503). A
request that arrives meanwhile waits for the one run in progress at most: the re-measure stops
there and is tried again at the next idle spell. A model found no faster is tried again after
twice the wait, up to `remeasure_max_interval_s`, so an idle server spends a handful of runs an
hour on each model.

A re-measure that finds a model no faster still sets its correction (observed over estimated,
which admission multiplies its estimates by) to what the idle lane measured
(`GraphCost.recalibrate`), and a model whose batches have run slower than its fit since it was
last timed is timed at the next idle spell whatever its wait: otherwise a busy spell's correction outlives the spell on a server with no
traffic to move it, and requests the limits allow get 503 on an idle lane (the message says the
model has run slower than measured; the Retry-After is this idle wait).

A server that is never idle that long is never timed again, so its traffic is: where a model's
batches have run at under 0.8 of its fit for 32 batches or more, the fit is scaled down to them
(`GraphCost.relax_from_batches`, checked every second; the same only-faster rule).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.admission import derive_limits
from service.costs import CostProbe, time_run

if TYPE_CHECKING:
    from service.registry import LoadedModel, ModelRegistry

OTHERS_BUSY_SHARE = 0.1  # other processes' share of the device above which the server is not idle enough to be timed
log = logging.getLogger("ganserve.remeasure")


@dataclass
class Schedule:
    due: float  # monotonic time from which the model may be timed again
    wait: float  # what the next wait will be if this one finds it no faster


def server_idle_for(registry: "ModelRegistry") -> float:
    """Seconds since any lane last computed, or 0 while a request holds memory or a job runs."""
    if registry.memory.used > 0 or registry.jobs.active() > 0:
        return 0.0
    lanes = [model.lane for model in registry.all_models() if model.lane is not None]
    return min((lane.idle_for() for lane in lanes), default=0.0)


def others_busy(registry: "ModelRegistry") -> bool:
    """Other processes want a noticeable share of the cores (`SharedDevice.other_share`): the
    lanes are idle but the device is not, and a model timed now is timed slow. Timed beside two
    spinning processes, sr-rrdb-x4's correction was set to their slowness and kept after they
    stopped, on top of admission's own count of them: 503 "slower than measured lately" on an
    idle machine."""
    return registry.shared_device.other_share() > OTHERS_BUSY_SHARE


def server_busy(registry: "ModelRegistry") -> bool:
    """Anything queued on a lane, in memory or in a job now, or other processes busy on the cores
    (checked between the timed runs)."""
    return (registry.memory.used > 0 or registry.jobs.active() > 0 or others_busy(registry)
            or any(model.lane is not None and model.lane.pending for model in registry.all_models()))


async def time_runs(registry: "ModelRegistry", model: "LoadedModel", probe: CostProbe) -> list[float] | None:
    """The probe's runs in its order (its shapes in turns), each alone on the model's lane; None
    as soon as other work appears."""
    inputs = [probe.make_inputs(key) for key, _ in probe.points]
    seconds = []
    for index in probe.order():
        if server_busy(registry) or model.lane is None or not model.ready:
            return None
        seconds.append(await model.lane.run(time_run, probe.run, inputs[index]))
    return seconds


async def remeasure(registry: "ModelRegistry", model: "LoadedModel") -> str:
    """Times each of the model's graphs again; relaxes the costs (and then the limits) that were
    measured too slow. Answers `relaxed`, `kept` or `interrupted`."""
    relaxed = False
    for graph, probe in model.probes.items():
        cost = model.costs.get(graph)
        if cost is None:
            continue
        seconds = await time_runs(registry, model, probe)
        if seconds is None:
            return "interrupted"
        was = (cost.per_unit_s, cost.overhead_s)
        fit = probe.fit_runs(seconds)
        if cost.relax(*fit):
            relaxed = True
            log.info("%s %s: timed faster while idle: %.4g s a unit + %.4g s a batch (was %.4g + %.4g)", model.entry.label, graph,
                     cost.per_unit_s, cost.overhead_s, *was)
        else:
            cost.recalibrate(*fit)  # the idle lane's time is the correction's evidence now
    if relaxed:
        model.limits = derive_limits(model, registry.settings, registry.request_memory_bytes())
        log.info("%s: limits now %s", model.entry.label, model.limits.describe())
    return "relaxed" if relaxed else "kept"


def relax_from_batches(registry: "ModelRegistry") -> None:
    """Scales down the fits the served batches have shown to be slow, and derives the limits again."""
    for model in registry.all_models():
        if not model.ready:
            continue
        relaxed = []
        for graph, cost in model.costs.items():
            was = (cost.per_unit_s, cost.overhead_s)
            if cost.relax_from_batches():
                relaxed.append(graph)
                log.info("%s %s: batches ran faster than measured: now %.4g s a unit + %.4g s a batch (was %.4g + %.4g)", model.entry.label,
                         graph, cost.per_unit_s, cost.overhead_s, *was)
        if relaxed:
            model.limits = derive_limits(model, registry.settings, registry.request_memory_bytes())
            registry.metrics.cost_remeasures.labels(model.entry.name, str(model.entry.version), "relaxed_by_batches").inc()
            log.info("%s: limits now %s", model.entry.label, model.limits.describe())


async def remeasure_when_idle(registry: "ModelRegistry") -> None:
    """Runs until the server drains (started by the app's lifespan where models compute: a single
    process, or a `--workers` engine, whose fronts take the new limits from its snapshots)."""
    settings = registry.settings
    idle_s = settings.remeasure_idle_s
    schedules: dict[int, Schedule] = {}
    while not registry.draining:
        await asyncio.sleep(min(1.0, idle_s / 2))
        if registry.loaded:
            relax_from_batches(registry)
        if not registry.loaded or server_idle_for(registry) < idle_s or others_busy(registry):
            continue
        models = [model for model in registry.all_models() if model.ready and model.probes]
        schedules = {id(model): schedules.get(id(model)) or Schedule(0.0, idle_s) for model in models}
        for model in sorted(models, key=lambda m: schedules[id(m)].due):
            schedule = schedules[id(model)]
            slowed = any(cost.slowed_since_timed for cost in model.costs.values())  # its batches ran slow: time it at this idle spell
            if registry.draining or (schedule.due > time.monotonic() and not slowed):
                continue
            outcome = await remeasure(registry, model)
            registry.metrics.cost_remeasures.labels(model.entry.name, str(model.entry.version), outcome).inc()
            if outcome == "interrupted":
                break  # traffic: wait for the next idle spell
            schedule.wait = idle_s if outcome == "relaxed" else min(2 * schedule.wait, settings.remeasure_max_interval_s)
            schedule.due = time.monotonic() + schedule.wait
