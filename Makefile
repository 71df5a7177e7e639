# The two commands of the README. Each builds its own virtualenv (.venv) from PyPI with the
# pinned versions of requirements.lock, then runs. The `tpu` extra (libtpu, ~700 MB) is
# installed so that the TPU compilation tests (tests/tpu) and `moe.plan` run on any machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-all lint bench setup

$(STAMP): setup.py requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[test,tpu]'
	touch $(STAMP)

setup: $(STAMP)

# Main job: a tiny sparse T5 (expert choice encoder, top-2 decoder) pretrained with span
# corruption on the English text shipped inside CPython; no download. ~5 minutes on 2 cores.
QUICKSTART_DIR ?= runs_out/quickstart
quickstart: $(STAMP)
	$(PY) -m moe.train --gin_file=runs/quickstart.gin --gin.MODEL_DIR="'$(QUICKSTART_DIR)'"

bench: $(STAMP)
	$(PY) -m moe.benchmarks.moe_layer --json bench_out/moe_layer.json

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --durations=15

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "" --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
