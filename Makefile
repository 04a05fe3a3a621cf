# Two commands on a fresh machine:  `make demo` (the whole job on generated videos) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# pytest-xdist workers for `make test` (0: one process); the Ray tests run together on one of them
TEST_WORKERS ?= 2

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

.PHONY: install demo test bench gpu-check
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/qprep demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

bench: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(VENV)/bin/python bench/cpu_stage.py
	$(VENV)/bin/python bench/extract.py
	$(VENV)/bin/python bench/train.py
	$(VENV)/bin/python bench/memory.py

# every bench's GPU rows, the bf16 check and the demo on cuda, one report (gpu-check/report.md);
# CPU sizes on a machine without a GPU
gpu-check: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(VENV)/bin/python bench/gpu_check.py
