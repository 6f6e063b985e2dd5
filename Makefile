# Two commands do all the set-up on a fresh machine (see README):
#   make demo   the whole pipeline on the embedded demo corpus (creates .venv on first use)
#   make test   ruff + the test suite
# Which torch wheel (docs/install.md): the default `torch==2.13.0` is whatever pip finds first, which
# on PyPI for Linux x86_64 is the CUDA build (~GBs with its CUDA libraries). On a CPU-only machine use
#   make test CPU=1                      torch from PyTorch's CPU wheel index (TORCH_INDEX)
#   make test TORCH_INDEX=<url>          any other index, e.g. a CUDA one: https://download.pytorch.org/whl/cu128
#   make demo TORCH="torch==2.13.0 ..."  the whole pip argument list for torch, as you like it
# These choose the wheel only when .venv is created: `make clean-venv` first to switch.

VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
CPU    ?=
TORCH_INDEX ?= $(if $(CPU),https://download.pytorch.org/whl/cpu)
PYTEST_ARGS ?=

.PHONY: demo test lint test-slow gpu-check clean-venv

$(VENV)/.installed: pyproject.toml setup.py z2all/data/_cleanc.c z2all/model/_decodec.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check z2all tests scripts

# pytest exits 5 when it collected no test. For `make test` that is a failure (a broken collection or a
# PYTEST_ARGS selection that matches nothing must not pass CI); `make test-slow` accepts it, because a
# checkout may have no slow test selected by its -m/-k.
test: lint
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-slow: no slow test selected"; rc=0; fi; exit $$rc

demo: $(VENV)/.installed
	$(VENV)/bin/z2all demo

clean-venv:
	rm -rf $(VENV)

# on a CUDA machine: the gpu-marked tests + `z2all bench kernels` + `z2all bench ablation --short` in < 8 min;
# logs to $$OUT or runs/gpu-check/ (no venv step: GPU boxes usually bring their own CUDA torch; PY=... to choose)
gpu-check:
	bash scripts/gpu_check.sh
