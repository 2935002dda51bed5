"""The baseline every `ganserve bench` run measures beside the real server: the FastAPI server a
person writes first. One ONNX Runtime session, one `sess.run` per request in FastAPI's thread
pool, no batching, no admission, no metrics; the same latents (models.latent.seed_latents) and
the same PNG encoding, so the two answer the same bytes and only the serving path differs.

Run as `python -m bench.naive --repository R --model M --port P` (the bench starts it as a
subprocess, like the real server)."""
from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from models.latent import seed_latents
from service.imaging import encode, to_uint8
from service.repository import scan_repository


class GenerateBody(BaseModel):
    seed: int = Field(0, ge=0, lt=2**63)


def naive_app(repository: Path, model: str, threads: int) -> FastAPI:
    from models.onnx_runtime import onnx_runtime

    ort = onnx_runtime()

    entry = max((e for e in scan_repository(repository) if e.name == model), key=lambda e: e.version)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(entry.path / entry.spec["formats"]["onnx"]["file"]), options, providers=["CPUExecutionProvider"])
    z_dim, value_range = entry.spec["z_dim"], tuple(entry.spec["value_range"])
    app = FastAPI(title="naive baseline")

    @app.get("/health/ready")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post(f"/v1/models/{model}/generate")
    def generate(body: GenerateBody) -> Response:
        z = seed_latents(z_dim, [body.seed]).numpy()
        (image,) = session.run(None, {"z": z})
        return Response(encode(to_uint8(image, value_range)[0], "png"), media_type="image/png")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    uvicorn.run(naive_app(args.repository, args.model, args.threads), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
