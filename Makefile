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
	# bytecode for every module, also where PYTHONDONTWRITEBYTECODE is set (pip leaves some
	# packages without it): each process then imports ~1.5 s faster. (A file that only a newer
	# Python compiles, as torch ships one, is left as it is.)
	$(PY) -m compileall -q -j 0 $(VENV)/lib src > /dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

# data.resplit=auto: the official MNIST split when it is found or downloadable, otherwise
# (offline, test split only) the test split divided into train/val/test, recorded in results.json.
run: $(STAMP)
	$(PY) -m lipvae.train data.resplit=auto $(ARGS)

# PYTHONDONTWRITEBYTECODE unset for the tests: pytest keeps its assertion-rewritten test modules
# and Python the bytecode of changed sources (in __pycache__/, ignored by git) between runs
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py

clean:
	rm -rf $(VENV) .pytest_cache
