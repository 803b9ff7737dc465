# Two entry points, each setting up a virtual environment first:
#   make demo   the main job        make test   the whole test suite
# Uses the active virtual environment if there is one, else creates .venv.

PYTHON ?= python3
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
# A CPU build of PyTorch unless torch is already installed (install your GPU build first to keep it).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.kiln-installed

# A data mirror beside the checkout (../shared/data) is used when KILN_DATA_DIR is not set.
ifeq ($(origin KILN_DATA_DIR),undefined)
  ifneq ($(wildcard ../shared/data),)
    export KILN_DATA_DIR := $(abspath ../shared/data)
  endif
endif

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || { echo "installing $(TORCH_SPEC) (CPU)"; \
		$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); }
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

demo: setup
	$(PY) -m kiln demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check kiln tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
