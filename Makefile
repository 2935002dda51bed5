# The doors a newcomer uses: make install, make run, make test, make models.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install run ray test models results bench screenshots clean

install: $(STAMP)

# torch and torchvision are installed first, pinned to the pair that imports together (spandrel,
# the SR architectures' loader, needs torchvision; see README "Install"), so that no looser range
# pulls another multi-GB build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[dev,cpu,ray]"
	touch $(STAMP)

# Serves model_repository/ (built by `make models` first if it holds no entry).
run: install
	@ls model_repository/*/*/spec.json >/dev/null 2>&1 || $(MAKE) models
	$(BIN)/ganserve serve --repository model_repository --host 0.0.0.0 --port $(PORT)

# The same repository on a local Ray Serve: replicas, autoscaling, failover per model (docs/ray.md).
ray: install
	@ls model_repository/*/*/spec.json >/dev/null 2>&1 || $(MAKE) models
	$(BIN)/ganserve ray --repository model_repository --host 0.0.0.0 --port $(PORT)

# Two phases, so that two cores are busy and no timing is disturbed: every test that can share the
# machine on two pytest-xdist workers (each file whole on one worker: tests/conftest.py), then the
# `quiet_host` ones alone (their servers weigh other processes' load). Both run, on one test model
# repository built once; either failing fails the target.
test: install
	export TESTS_SHARED_REPOSITORY=$$(mktemp -d); \
	$(BIN)/pytest -q -n 2 -m "not quiet_host"; shared=$$?; \
	$(BIN)/pytest -q -m quiet_host; quiet=$$?; \
	rm -rf "$$TESTS_SHARED_REPOSITORY"; [ $$shared -eq 0 ] && [ $$quiet -eq 0 ]

# Rebuilds the default models from scratch with the project's own commands (about 3 h on 2 cores:
# the digits models ~15 min, the StyleGAN ~2 h, CycleGAN ~15 min, SR x4 ~35 min).
models: install
	rm -rf runs/models
	$(BIN)/ganserve train --config configs/dcgan-digits.yaml --out runs/models/dcgan-digits
	$(BIN)/ganserve export runs/models/dcgan-digits --name dcgan-digits --version 1 --repository model_repository
	$(BIN)/ganserve train --config configs/cdcgan-digits.yaml --out runs/models/cdcgan-digits
	$(BIN)/ganserve export runs/models/cdcgan-digits --name cdcgan-digits --version 1 --repository model_repository
	$(BIN)/ganserve train --config configs/sr-rrdb-x4.yaml --out runs/models/sr-rrdb-x4
	$(BIN)/ganserve export runs/models/sr-rrdb-x4 --name sr-rrdb-x4 --version 1 --repository model_repository
	$(BIN)/ganserve train --config configs/cyclegan-thin2thick.yaml --out runs/models/cyclegan-thin2thick
	$(BIN)/ganserve export runs/models/cyclegan-thin2thick --name cyclegan-thin2thick --version 1 --repository model_repository
	$(BIN)/ganserve train --config configs/stylegan-shapes.yaml --out runs/models/stylegan-shapes
	$(BIN)/ganserve export runs/models/stylegan-shapes --name stylegan-shapes --version 1 --repository model_repository

# Trains and evaluates every run behind docs/results.md (about 6 hours on 2 cores; finished runs are reused).
results: install
	$(BIN)/ganserve results --out docs/results.md

bench: install
	$(BIN)/ganserve bench --repository model_repository --model dcgan-digits

# docs/images/playground-*.png: each playground tool driven in headless Chromium against a server on
# model_repository/ (needs apt-get install chromium chromium-driver; about 30 s).
screenshots: install
	$(BIN)/python docs/make_screenshots.py

clean:
	rm -rf $(VENV) runs
