# Two commands do all the set-up on a fresh machine (see README):
#   make demo   the whole pipeline on the embedded demo corpus (creates .venv on first use)
#   make test   ruff + the test suite
# GPU users: make demo TORCH="torch==2.13.0 --index-url <your CUDA index>" (or any torch build you have).

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint test-slow gpu-check clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check z2all tests scripts

# pytest exits 5 when it collected no test; treat that as success only for an explicit -m selection
test: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

demo: $(VENV)/.installed
	$(VENV)/bin/z2all demo

clean-venv:
	rm -rf $(VENV)

# on a CUDA machine: the gpu-marked tests + `z2all bench kernels` + `z2all bench ablation --short` in < 8 min;
# logs to $$OUT or runs/gpu-check/ (no venv step: GPU boxes usually bring their own CUDA torch; PY=... to choose)
gpu-check:
	bash scripts/gpu_check.sh
