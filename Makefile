# The two commands of the README do all set-up on a fresh machine and are cheap when nothing changed:
#   make book   venv, install, data, then build the whole book, every chapter executed in full mode
#   make test   venv, install, data, then unit tests and every notebook under nbval in quick mode
# Also: make bench (speed against the peer libraries), make notebooks (re-store notebooks for nbval).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BOOK_FLAGS := --config book/_config.yml --toc book/_toc.yml
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: book test bench data setup system notebooks clean

book: data
	@# jupyter-cache keys on code cells and Sphinx re-reads changed pages only: a changed vefi must re-run
	@# every chapter, so forget both the execution cache and Sphinx's environment
	@h=$$(find pyproject.toml vefi -name "*.py" -o -name pyproject.toml | sort | xargs cat | sha256sum | cut -c1-16); \
	if [ "$$(cat _build/.vefi-hash 2>/dev/null)" != "$$h" ]; then \
	  echo "vefi changed: every chapter will run again"; rm -rf _build/.jupyter_cache _build/.doctrees; \
	  mkdir -p _build; echo "$$h" > _build/.vefi-hash; fi
	VEFI_QUICK=0 VEFI_PROGRESS=off $(VENV)/bin/jupyter-book build . $(BOOK_FLAGS) -W -n --keep-going
	@echo "The book is in _build/html/index.html"

test: data
	$(PY) -m pytest -q --doctest-modules tests vefi
	VEFI_QUICK=1 VEFI_PROGRESS=off $(PY) -m pytest -q -p no:cacheprovider --nbval-lax \
	  --nbval-sanitize-with notebooks/sanitize.cfg notebooks/

bench: data
	@for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

data: setup
	$(PY) -m vefi.data fetch

setup: $(INSTALLED) system

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "vefi needs Python >= 3.11 (found $$($(PYTHON) --version)); set PYTHON=python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Fashion-MNIST comes from Debian's package; install it when we may, else vefi.data says what to do.
system:
	@if [ -d $(FASHION_DIR) ] || [ -d data/fashion-mnist ] || [ -n "$$VEFI_FASHION_MNIST" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' (see data/README.md)"; fi

notebooks: data
	$(PY) scripts/store_notebook.py notebooks/*.ipynb

clean:
	rm -rf _build
