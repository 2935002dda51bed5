# ganserve image. GPU (default): CUDA runtime base, onnxruntime-gpu, CUDA PyTorch.
#   docker build -t ganserve .
# CPU: a slim Python base and onnxruntime.
#   docker build -t ganserve:cpu --build-arg BASE=python:3.11-slim --build-arg VARIANT=cpu .
ARG BASE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG VARIANT=gpu

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN if ! command -v python3 >/dev/null; then apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*; fi \
    && (python3 -m venv /opt/venv || (apt-get update && apt-get install -y --no-install-recommends python3-venv && python3 -m venv /opt/venv))

WORKDIR /app
COPY pyproject.toml README.md ganserve_cli.py ./
COPY models ./models
COPY training ./training
COPY service ./service
COPY bench ./bench
COPY repository ./repository
COPY ganserve ./ganserve
# torch and torchvision first, pinned as a pair, then the project with the runtime that matches the variant
RUN pip install --upgrade pip && pip install torch==2.14.1 torchvision==0.29.1 && pip install ".[${VARIANT}]"
COPY docker/entrypoint.sh /usr/local/bin/ganserve-entrypoint
COPY model_repository ./model_repository

EXPOSE 8000
ENV GANSERVE_REPOSITORY=/app/model_repository GANSERVE_HOST=0.0.0.0 GANSERVE_PORT=8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready').status != 200)"
ENTRYPOINT ["ganserve-entrypoint"]
CMD ["ganserve", "serve"]
