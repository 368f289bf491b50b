# `make demo` and `make test` do all the set-up on a fresh clone: a virtualenv in .venv with the
# pinned torch/torchvision (constraints.txt) and surgery installed in editable mode.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast lint docs docs-serve bench bench-scale

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python recipes/resnet18_head.py

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not demo" --durations=20

# test plus the full recipe demo (what `make demo` runs, about 2 minutes on its own)
test-all: $(STAMP)
	$(VENV)/bin/python -m pytest --durations=20

# test-fast: no slow tests and none that spawn processes (ranks, scripts, a fresh venv)
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not distributed"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# The documentation site into site/ (docs/, mkdocs.yml); --strict: any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --strict

bench: $(STAMP)
	$(VENV)/bin/python tests/benchmarks/load_bench.py

bench-scale: $(STAMP)
	$(VENV)/bin/python tests/benchmarks/scale_bench.py --params 1.1e9 --read-speed
