"""Projection of an uploaded image into a style model's W+, run as a bounded background job."""
from __future__ import annotations

import base64
import numpy as np
import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from safetensors.torch import load_file

from models.classifier import ShapesPredictor
from models.projection import project
from models.spec import ModelSpec
from models.zoo import build_generator
from service.errors import ApiError
from service.imaging import UploadError, decode_upload, encode, fit_square, to_uint8
from service.registry import LoadedModel
from service.repository import ModelEntry
from service.requests import read_upload, registry_of
from service.routes.style import style_model

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
        network.load_state_dict(load_file(str(entry.path / info["file"])))
        features = network.eval().requires_grad_(False).features
    model.projection = (generator, features)
    return model.projection


def target_tensor(image: np.ndarray, entry: ModelEntry) -> torch.Tensor:
    fitted = fit_square(image, entry.spec["resolution"]).astype(np.float32) / 127.5 - 1  # [H, W, 3]
    if entry.spec["channels"] == 1:
        fitted = fitted.mean(axis=2, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(fitted.transpose(2, 0, 1)))


@router.post("/models/{name}/project", status_code=202)
async def project_image(name: str, request: Request, steps: int = Query(200, ge=1, description="optimisation steps")) -> JSONResponse:
    """Upload an image (raw PNG/JPEG/WebP body or a multipart `file`); returns a job to poll."""
    registry = registry_of(request)
    model = style_model(request, name)
    limit = registry.settings.max_projection_steps
    if steps > limit:
        raise ApiError(422, f"steps: at most {limit}")
    data, _ = await read_upload(request)
    try:
        image = decode_upload(data, registry.settings.max_upload_pixels)
    except UploadError as error:
        raise ApiError(error.status, str(error))
    entry = model.entry
    target = target_tensor(image, entry)

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


@router.get("/jobs/{job_id}")
async def job_status(job_id: str, request: Request) -> dict:
    """A job's state (queued, running, done, failed), progress and, once done, its result."""
    return registry_of(request).jobs.get(job_id).to_dict()
