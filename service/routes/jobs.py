"""Projection of an uploaded image into a style model's W+, run as a bounded background job."""
from __future__ import annotations

import base64
from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load_file

from models.classifier import ShapesPredictor
from models.projection import project
from models.spec import ModelSpec
from models.zoo import build_generator
from service.errors import ApiError, error_responses
from service.imaging import DECODE_BYTES_PER_PIXEL, encode, to_uint8
from service.pipeline import begin, registry_of, reserve
from service.registry import LoadedModel
from service.schemas import ProjectionSteps
from service.style import require_style
from service.uploads import IMAGE_BODY, prepare, probe, read_upload

router = APIRouter(prefix="/v1", tags=["jobs"])
FEATURE_NETWORKS = {"shapes_predictor": ShapesPredictor}


def projection_networks(model: LoadedModel):
    """The eager generator (gradients need it) and the entry's feature network, if it ships one;
    built once per model, in the job thread."""
    if model.projection is not None:
        return model.projection
    entry = model.entry
    generator = build_generator(ModelSpec.from_dict(entry.spec["model"]))
    generator.load_state_dict(load_file(str(entry.file_for("eager"))))
    generator.eval().requires_grad_(False)
    features = None
    info = entry.spec.get("feature_network")
    if info:
        network = FEATURE_NETWORKS[info["name"]]()
        network.load_state_dict(load_file(str(entry.file_within(info["file"]))))
        features = network.eval().requires_grad_(False).features
    model.projection = (generator, features)
    return model.projection


@router.post("/models/{name}/project", status_code=202, openapi_extra=IMAGE_BODY, responses=error_responses(404, 413, 415, 422, 429, 503))
async def project_image(name: str, request: Request, steps: Annotated[ProjectionSteps, Query(description="optimisation steps")] = 200) -> JSONResponse:
    """Upload an image (raw PNG/JPEG/WebP body or a multipart `file`); returns a job to poll."""
    registry = registry_of(request)
    model = begin(request, name, "project")
    require_style(model)
    limit = registry.settings.max_projection_steps
    if steps > limit:
        raise ApiError(422, f"steps: at most {limit}")
    registry.jobs.check_room()  # before the upload is decoded
    data = await read_upload(request)
    width, height = await probe(registry, data)
    reserve(request, width * height * DECODE_BYTES_PER_PIXEL)
    entry = model.entry
    resolution = entry.spec["resolution"]
    target = torch.from_numpy(await prepare(registry, data, entry.spec["channels"], (resolution, resolution), fit="square"))

    def work(job, tick) -> dict:
        generator, features = projection_networks(model)
        result = project(generator.synthesis, target, generator.w_avg, entry.spec["num_ws"], steps=steps, features=features,
                         progress=lambda step, loss: tick(step))
        if result.steps < steps:
            raise TimeoutError(f"time limit of {registry.settings.max_job_seconds:g} s reached at step {result.steps} of {steps}")
        picture = to_uint8(result.image[None].numpy(), tuple(entry.spec["value_range"]))[0]
        return {"ws": result.ws.tolist(), "psnr": result.psnr, "steps": result.steps,
                "reconstruction": {"format": "png", "data": base64.b64encode(encode(picture, "png")).decode()}}

    job = registry.jobs.submit("project", name, steps, work)
    return JSONResponse({"job_id": job.id, "status_url": f"/v1/jobs/{job.id}", "state": job.state}, status_code=202)


@router.get("/jobs/{job_id}", responses=error_responses(404))
async def job_status(job_id: str, request: Request) -> dict:
    """A job's state (queued, running, done, failed, cancelled), progress and, once done, its result."""
    return registry_of(request).jobs.get(job_id).to_dict()
