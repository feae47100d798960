# Two entry points on a fresh Debian machine: `make demo` and `make test`.
# Each installs what it needs (system packages when missing, a virtualenv in .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := mosquitto dataset-fashion-mnist

.PHONY: demo test lint system-packages benchmark-fashion-mnist clean

demo: system-packages $(VENV)/.runtime
	$(BIN)/edvit demo

test: system-packages $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# Rebuilds the shipped Fashion-MNIST bundle and its report.json (about 20 minutes on 2 cores).
benchmark-fashion-mnist: system-packages $(VENV)/.dev
	$(BIN)/edvit build --dataset fashion-mnist --num-devices 3 --out models/bundles/fashion-mnist-3 --force

system-packages:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
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
	$(BIN)/pip install -q -e '.[build,datasets,test]'
	touch $@ $(VENV)/.runtime

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
