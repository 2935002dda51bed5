# The doors a newcomer uses: make install, make run, make test, make models.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test models results clean

install: $(STAMP)

# torch is installed first, pinned, so that no multi-GB CUDA build is pulled by a looser range.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev,cpu]"
	touch $(STAMP)

run: install
	$(BIN)/ganserve train --config configs/dcgan-digits.yaml --out runs/dcgan-digits
	$(BIN)/ganserve sample runs/dcgan-digits --n 64 --out runs/dcgan-digits/sample_grid.png

test: install
	$(BIN)/pytest -q

results: install
	$(BIN)/ganserve results --out docs/results.md

clean:
	rm -rf $(VENV) runs
