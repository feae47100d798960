# Two entry points on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs (system packages when missing, a virtualenv in .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := mosquitto dataset-fashion-mnist chromium prometheus

.PHONY: demo test docs system-packages benchmark-ed-vit benchmark-original benchmark-batching benchmark-slicing benchmark-e2e clean

demo: system-packages $(VENV)/.runtime
	$(BIN)/edvit demo

test: system-packages $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	$(BIN)/pytest -n 2 --dist loadfile --no-loadscope-reorder

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link fails it.
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# ED-ViT at the defaults (no tuning flags) for N = 2, 3, 5, 10 from the shipped converged
# original, then digits (trains its own original). Hours on 2 cores; see docs/benchmarks/ed-vit.md.
benchmark-ed-vit: system-packages $(VENV)/.dev
	$(BIN)/python benchmarks/ed_vit.py --dataset fashion-mnist --devices 2 3 5 10 --out runs/ed_vit --checkpoint benchmarks/checkpoints/fashion-mnist-small.pt --reuse
	$(BIN)/python benchmarks/ed_vit.py --dataset digits --devices 2 3 5 --out runs/ed_vit --reuse --plot runs/ed_vit/digits.png

# The converged original: Fashion-MNIST, small preset, the default recipe (40 epochs with
# shifts and flips). About 100 minutes on 2 cores; minutes with --device cuda.
benchmark-original: system-packages $(VENV)/.dev
	$(BIN)/python benchmarks/original_recipe.py --dataset fashion-mnist --out runs/fashion-mnist-small.pt --json runs/fashion-mnist-small.json

# Simulated cameras against one node (a few minutes).
benchmark-batching: system-packages $(VENV)/.runtime
	$(BIN)/edvit bench batching --fps 100 --json benchmarks/results/batching.json

# A Fashion-MNIST bundle with a 3-block shared stem, then J = 0..3 head slices on the cameras.
benchmark-slicing: system-packages $(VENV)/.dev
	$(BIN)/edvit build --dataset fashion-mnist --size medium --num-devices 3 --shared-blocks 3 --epochs 2 --sub-epochs 1 --recover-epochs 1 --prune-steps 1 --fusion-epochs 5 --out runs/sliced-fm3-medium --force
	$(BIN)/edvit bench slicing runs/sliced-fm3-medium --json benchmarks/results/slicing.json

# The pipeline's p50/p95 and median per stage against its floor, for the split fleet and the
# original served whole, at 1, 4 and 16 cameras (about a minute; onnx, from the build extra,
# makes the monolithic bundle).
benchmark-e2e: system-packages $(VENV)/.dev
	$(BIN)/edvit bench e2e --cameras 1 4 16 --fps 10 --seconds 5 --json benchmarks/results/e2e.json

# The unit tier (no broker, no process, no model build; tests/conftest.py) and the lint:
# under a minute on 2 cores, with 20 hypothesis examples per topic handler instead of 60.
# `make test` runs every tier.
.PHONY: test-fast
test-fast: system-packages $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	EDVIT_FUZZ_EXAMPLES=20 $(BIN)/pytest -n 2 --dist loadfile -m unit

system-packages:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/promtool ] || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Runtime only: no torch, as on an edge board.
$(VENV)/.runtime: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[datasets]'
	touch $@

# Everything: the build extra pins torch/torchvision (several GB, a few minutes).
$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[build,datasets,dev]'
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
