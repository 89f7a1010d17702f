# Two commands on a fresh machine: `make run` (one run on defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 geoopt==0.5.1 deel-torchlip==1.0.5 pytest-xdist==3.8.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# data.resplit=auto: the official MNIST split when it is found or downloadable, otherwise
# (offline, test split only) the test split divided into train/val/test, recorded in results.json.
run: $(STAMP)
	$(PY) -m lipvae.train data.resplit=auto $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache
