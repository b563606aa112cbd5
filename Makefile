# Two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs gradlab, runs the demo (its report: runs/demo/demo.html, ignored by git)
#   make test   creates .venv, installs gradlab with the dev extra, runs the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q

# Beside a checkout that has the bundled offline CIFAR-10 copy (../shared/data, as on the
# project's machines and CI), build it once into .data; elsewhere torchvision downloads it.
BUNDLED := $(wildcard ../shared/data/build_cifar10.py)
ifneq ($(BUNDLED),)
GRADLAB_DATA ?= $(CURDIR)/.data
export GRADLAB_DATA
DATA_STAMP := $(GRADLAB_DATA)/cifar-10-batches-py/batches.meta
else
DATA_STAMP :=
endif

# The HTML report tests drive Debian's chromium through playwright (never a downloaded browser).
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-fast bench data install browser clean strip-notebooks

$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP_INSTALL) -e '.[dev]'
	touch $@

install: $(VENV)/.base

data: $(DATA_STAMP)

ifneq ($(DATA_STAMP),)
$(DATA_STAMP): | $(VENV)/.base
	$(PY) $(BUNDLED) $(GRADLAB_DATA)
endif

browser: $(CHROMIUM)

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "note: the browser tests need Debian's chromium: sudo apt-get install chromium" >&2; \
	fi

demo: $(VENV)/.base $(DATA_STAMP)
	$(VENV)/bin/gradlab demo

test: $(VENV)/.dev $(DATA_STAMP) browser
	$(PY) -m pytest

test-fast: $(VENV)/.dev $(DATA_STAMP)
	$(PY) -m pytest -m "not slow"

# The performance table of README.md: every benchmark, side by side against the notebook's pipeline.
bench: $(VENV)/.dev $(DATA_STAMP)  # .dev: the TensorBoard sink's row needs the tensorboard extra
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/allocator.py
	$(PY) benchmarks/recorder_overhead.py --reps 20 --depths 6 32 --blocks conv res
	$(PY) benchmarks/recorder_overhead.py --reps 20 --depths 6 32 --blocks conv res --precision bf16
	$(PY) benchmarks/recorder_overhead.py --reps 10 --model torchvision:resnet18
	$(PY) benchmarks/recorder_overhead.py --reps 12 --depths 6 32 --blocks conv res --tensorboard --flush-every 8 --threads 1
	$(PY) benchmarks/roofline.py
	$(PY) benchmarks/epoch.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/demo_time.py
	$(PY) benchmarks/lessons_time.py

# The lesson notebook is committed without outputs (tests/test_notebook.py checks): run this after editing it in Jupyter.
strip-notebooks: $(VENV)/.dev
	$(PY) examples/strip_outputs.py examples/*.ipynb

clean:
	rm -rf $(VENV) .data runs .pytest_cache
