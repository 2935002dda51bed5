"""Projection of an uploaded image into a style model's W+, run as a bounded background job;
its state polled and the job cancelled by id."""
from __future__ import annotations

import asyncio
import base64
import time
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter

from models.projection import project
from service.errors import ApiError, error_responses
from service.imaging import DECODE_BYTES_PER_PIXEL, encode, to_uint8
from service.pipeline import KnownQueryRoute, begin, checked_on_headers, client_address, query_value, registry_of, request_deadline, reserve
from service.projection import projection_bytes, projection_networks
from service.registry import LoadedModel
from service.schemas import VERSION_TEXT, ProjectionSteps, VersionText
from service.style import require_style
from service.uploads import IMAGE_BODY, prepare, probe, read_upload, upload_media

router = APIRouter(prefix="/v1", tags=["jobs"], route_class=KnownQueryRoute)  # 422 for a query parameter an operation does not take


async def working_bytes(model: LoadedModel) -> int:
    """A projection job's memory for this model, counted once (on the meta device, off the loop)."""
    if model.projection_bytes is None:
        try:
            model.projection_bytes = await asyncio.get_running_loop().run_in_executor(None, projection_bytes, model.entry)
        except Exception as error:  # a generator the project's eager code cannot build
            raise ApiError(422, f"model {model.entry.name!r} cannot be projected into ({type(error).__name__}: {str(error)[:200]})")
    return model.projection_bytes


MIN_TIMED_STEPS = 10  # fewer are mostly the first step's set-up


def refuse_past_the_time_limit(model: LoadedModel, steps: int, max_seconds: float) -> None:
    """413 for a job whose steps could not finish within the job time limit even at the fastest
    rate this model's jobs have run: its cost is known before it is queued. The first job of a
    version has no such figure and runs; stopped by the limit, it is `done` with what it reached."""
    step_s = model.projection_step_s
    if step_s is None or steps * step_s <= max_seconds:
        return
    raise ApiError(413, f"{steps} steps would take about {steps * step_s:.0f} s at this model's fastest measured "
                        f"{1000 * step_s:.1f} ms a step, past the job time limit of {max_seconds:g} s "
                        f"(GANSERVE_MAX_JOB_SECONDS); ask for at most {int(max_seconds / step_s)}", code="too_expensive")


def record_step_time(model: LoadedModel, steps: int, seconds: float) -> None:
    """Keeps the fastest per-step time of the version's jobs (one job at a time runs, so the
    fastest is the least disturbed by other work; a busy spell never tightens the refusal)."""
    if steps >= MIN_TIMED_STEPS:
        step_s = seconds / steps
        model.projection_step_s = step_s if model.projection_step_s is None else min(model.projection_step_s, step_s)


def projected_model(request: Request, name: str, steps: int, version: int | None) -> LoadedModel:
    """The style model a projection request addresses, its steps checked (404, 422, 413): what is
    refused before the upload is read. (A `--workers` front runs it too, before it checks the
    upload and forwards the request to the engine: service/routes/engine_proxy.py.)"""
    registry = registry_of(request)
    model = begin(request, name, "project", version)
    require_style(model)
    limit = registry.settings.max_projection_steps
    if steps > limit:
        raise ApiError(422, f"steps: at most {limit}")
    refuse_past_the_time_limit(model, steps, registry.settings.max_job_seconds)
    return model


DEFAULT_PROJECTION_STEPS = 200
STEPS_QUERY = TypeAdapter(ProjectionSteps)


def projection_headers(request: Request) -> None:
    """What a projection upload is refused on its path, query and headers alone
    (`checked_on_headers`, in one process and in a `--workers` front): an unknown or unready model
    or version, one that is no style model, `steps` past the server's limits, a body of a type it
    does not read (after the 422s of its parameters' types: `checked_on_headers`)."""
    name, version = request.path_params["name"], query_value(request, "version", VERSION_TEXT)
    steps = query_value(request, "steps", STEPS_QUERY, default=DEFAULT_PROJECTION_STEPS)
    if steps is None:
        require_style(begin(request, name, "project", version))
    else:
        projected_model(request, name, steps, version)
    upload_media(request)


@router.post("/models/{name}/project", status_code=202, openapi_extra=IMAGE_BODY, responses=error_responses(404, 413, 415, 422, 429, 503, 504))
@checked_on_headers(projection_headers)
async def project_image(name: str, request: Request, steps: Annotated[ProjectionSteps, Query(description="optimisation steps: at most GANSERVE_MAX_PROJECTION_STEPS (1000 by default)")] = DEFAULT_PROJECTION_STEPS,
                        version: Annotated[VersionText | None, Query()] = None) -> JSONResponse:
    """Upload an image (raw PNG/JPEG/WebP body or a multipart `file`); returns a job to poll."""
    registry = registry_of(request)
    model = projected_model(request, name, steps, version)
    owner = client_address(request)
    with registry.jobs.claim(owner):  # a job slot, held from before the upload is read until the job is submitted
        working = await working_bytes(model)
        registry.jobs.check_fits(working)
        data = await read_upload(request)
        width, height = await probe(registry, data, request_deadline(request))
        reserve(request, width * height * DECODE_BYTES_PER_PIXEL)
        entry = model.entry
        resolution = entry.spec["resolution"]
        target = torch.from_numpy(await prepare(registry, data, entry.spec["channels"], (resolution, resolution), fit="square",
                                                pool=registry.jobs.intake, deadline=request_deadline(request)))

        def work(job, tick) -> dict:
            networks = projection_networks(entry)
            started = last_step = time.perf_counter()

            def progress(step: int, loss: float) -> bool:
                nonlocal last_step
                last_step = time.perf_counter()
                return tick(step)

            result = project(networks.generator.synthesis, target, networks.generator.w_avg, entry.spec["num_ws"], steps=steps,
                             features=networks.features, progress=progress)
            # the steps alone: with the final render and its PSNR counted, a loaded machine made the rate
            # say fewer steps fit the time limit than the job had just reached within it
            record_step_time(model, result.steps, last_step - started)
            picture = to_uint8(result.image[None].numpy(), tuple(entry.spec["value_range"]))[0]
            answer = {"ws": result.ws.tolist(), "psnr": result.psnr, "steps": result.steps,
                      "reconstruction": {"format": "png", "data": base64.b64encode(encode(picture, "png")).decode()}}
            if result.steps < steps:  # the time limit (a cancel or shutdown: the store says `cancelled`): what it reached is kept
                answer["stopped"] = f"the time limit of {registry.settings.max_job_seconds:g} s, at step {result.steps} of {steps}"
            return answer

        job = registry.jobs.submit("project", name, steps, work, working_bytes=working, held_bytes=target.numel() * target.element_size(),
                                   claimed=True, owner=owner)
    return JSONResponse({"job_id": job.id, "status_url": f"/v1/jobs/{job.id}", "state": job.state}, status_code=202)


@router.get("/jobs/{job_id}", responses=error_responses(404))
async def job_status(job_id: str, request: Request) -> dict:
    """A job's state (queued, running, done, failed, cancelled), progress and, once done, its result."""
    return registry_of(request).jobs.get(job_id).to_dict()


@router.delete("/jobs/{job_id}", responses=error_responses(404))
async def cancel_job(job_id: str, request: Request) -> dict:
    """Cancels a job: a queued one never starts, a running one stops at its next step (it says
    `running` until then, `cancelled` after), a finished one is forgotten (its result with it)."""
    return registry_of(request).jobs.cancel(job_id).to_dict()
