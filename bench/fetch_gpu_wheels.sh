#!/usr/bin/env bash
# The wheels the lent GPU machine lacks (its image has CUDA PyTorch, torchvision, numpy, Pillow,
# OpenCV, ONNX Runtime, httpx, prometheus-client, typer, rich, safetensors; not the web stack),
# for its Python 3.12, into .whl/ (ignored by git; ~4 MB). Run once here, before
# `bash bench/gpu_session.sh` is sent with carry=[".whl"]. Versions: those `make install` takes here.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pin() { .venv/bin/python -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }
packages=()
for name in fastapi starlette uvicorn pydantic pydantic_core pydantic-settings python-dotenv annotated-types typing-inspection \
            python-multipart spandrel httptools websockets typing_extensions orjson; do
    packages+=("$(pin "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${packages[@]}"
ls .whl
