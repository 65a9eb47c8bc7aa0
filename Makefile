# The two commands of the README. Each does its own set-up on a fresh machine.
#   make demo   set up, then run the demo (real data, about 5 minutes on 2 cores)
#   make test   set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup native data lint bench-full perf clean

demo: setup data native
	$(VENV)/bin/dmc demo

test: setup data native
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

setup: $(VENV)/.installed

# torch first, pinned, so that pip takes the CPU build and never a multi-GB CUDA one.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[all,test]"
	touch $@

# grid mode's compiled CPU kernels (src/torch_dmc/native.py), built now rather than by the first
# test or job that needs them; quick when they are built already, and harmless where they cannot
# be (a warning, and the PyTorch implementation runs: the same results)
native: setup
	$(PY) -c "from torch_dmc import native; native.build()"

data:
	@if [ ! -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

perf: setup data
	$(PY) benchmarks/perf.py --out results/perf

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
