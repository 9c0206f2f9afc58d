# The two commands of the README do all set-up on a fresh machine and are cheap when nothing changed:
#   make book   venv, install, data, then build the whole book, every chapter executed in full mode
#   make test   venv, install, data, then unit tests and every notebook under nbval in quick mode
#               and a browser test of the site built in quick mode (headless Chromium) from nbval's
#               execution of the notebooks (each notebook runs once)
# Also: make bench (speed against the peer libraries), make notebooks (re-store notebooks for nbval),
#       make networks (train every network of the book in full mode and ship its weights in book/networks),
#       make quickbook (the book in quick mode, in _build/quick; what the browser test visits),
#       make check-book (the browser test on the full book in _build/html, after make book).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
BOOK_FLAGS := --config book/_config.yml --toc book/_toc.yml
FASHION_DIR := /usr/share/datasets/fashion-mnist
VENDOR := book/_static/vendor
# The quick-mode book has its own output folder and execution cache: quick and full outputs never mix.
QUICK_OUT := _build/quick
QUICK_HTML := $(QUICK_OUT)/_build/html
QUICK_CACHE := $(QUICK_OUT)/_build/.jupyter_cache
# extra jupyter-book flags of the quick book: `make test` passes --all (read every page again, since nbval
# has just replaced the cached outputs, which Sphinx does not track)
QUICKBOOK_FLAGS ?=
NBVAL := -p no:cacheprovider --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg

.PHONY: book quickbook check-book test bench data setup system vendor notebooks networks api clean

# jupyter-cache keys on code cells and Sphinx re-reads changed pages only: a changed vefi (or new shipped
# networks) must re-run every chapter, so forget both the execution cache and Sphinx's environment of the
# build folder $(1)
define forget_if_vefi_changed
	@h=$$(find pyproject.toml vefi book/networks -name "*.py" -o -name pyproject.toml -o -name "*.pt" | sort \
	  | xargs cat | sha256sum | cut -c1-16); \
	if [ "$$(cat $(1)/.vefi-hash 2>/dev/null)" != "$$h" ]; then \
	  echo "vefi changed: every chapter will run again"; rm -rf $(1)/.jupyter_cache $(1)/.doctrees; \
	  mkdir -p $(1); echo "$$h" > $(1)/.vefi-hash; fi
endef

book: data vendor api
	$(call forget_if_vefi_changed,_build)
	VEFI_QUICK=0 VEFI_PROGRESS=off $(VENV)/bin/jupyter-book build . $(BOOK_FLAGS) -W -n --keep-going
	@echo "The book is in _build/html/index.html"

quickbook: data vendor api
	$(call forget_if_vefi_changed,$(QUICK_OUT)/_build)
	VEFI_QUICK=1 VEFI_PROGRESS=off $(VENV)/bin/jupyter-book build . $(BOOK_FLAGS) --path-output $(QUICK_OUT) \
	  -W -n --keep-going $(QUICKBOOK_FLAGS)
	@echo "The quick-mode book is in $(QUICK_HTML)/index.html"

# The browser test on the full book that `make book` built (it is not run by `make test`: too slow to build)
check-book: setup
	@test -f _build/html/index.html || { echo "no full book in _build/html: run 'make book' first"; exit 1; }
	VEFI_SITE=_build/html $(PY) -m pytest -q -rs -p no:cacheprovider tests/browser

# nbval runs every notebook once: tests/nbval_capture.py stores each notebook that passed, executed, in the
# quick book's execution cache, and the quick book then takes its outputs from there instead of running it
test: data
	$(PY) -m pytest -q --doctest-modules tests vefi --ignore=tests/browser
	$(call forget_if_vefi_changed,$(QUICK_OUT)/_build)
	VEFI_QUICK=1 VEFI_PROGRESS=off $(PY) -m pytest -q $(NBVAL) -p tests.nbval_capture \
	  --nbval-store $(QUICK_CACHE) notebooks/
	@# the browser test: build the quick book only when Chromium can visit it (the test skips, saying why,
	@# when Chromium is missing and we are not root to install it)
	@if [ "$$(id -u)" = 0 ] || { command -v chromium && command -v chromedriver && command -v npm; } >/dev/null; \
	then $(MAKE) --no-print-directory quickbook QUICKBOOK_FLAGS=--all; fi
	VEFI_SITE=$(QUICK_HTML) $(PY) -m pytest -q -rs -p no:cacheprovider --doctest-modules book/_ext tests/browser

bench: data
	@for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

data: setup
	$(PY) -m vefi.book.data fetch

setup: $(INSTALLED) system

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "vefi needs Python >= 3.11 (found $$($(PYTHON) --version)); set PYTHON=python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# Debian packages: Fashion-MNIST (the data), nodejs + npm (to vendor the book's JavaScript), chromium +
# chromium-driver (the browser test). Installed when we may (root with apt-get), else we say what to run.
system:
	@need=""; \
	[ -d $(FASHION_DIR) ] || [ -d data/fashion-mnist ] || [ -n "$$VEFI_FASHION_MNIST" ] || need="$$need dataset-fashion-mnist"; \
	command -v npm >/dev/null || need="$$need nodejs npm"; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	command -v chromedriver >/dev/null || need="$$need chromium-driver"; \
	if [ -z "$$need" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian's$$need"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	else echo "missing Debian packages: run 'sudo apt-get install$$need' (see README.md)"; fi

# The book's JavaScript (widget manager, require.js, MathJax) from npm, pinned by package-lock.json, copied
# to $(VENDOR) for the pages to load without a CDN. Runs again only when the pins change.
vendor: $(VENDOR)/VERSIONS.json

$(VENDOR)/VERSIONS.json: package.json package-lock.json scripts/vendor_js.py | system
	@command -v npm >/dev/null || { echo "npm missing: run 'sudo apt-get install nodejs npm'"; exit 1; }
	npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	$(PYTHON) scripts/vendor_js.py

# The weights of every network the book trains, shipped in book/networks so that a first `make book` trains
# nothing; run again after any change to the training code, schedules or data (a build says when)
networks: data
	VEFI_QUICK=0 $(PY) -m vefi.book.train ship

notebooks: data
	$(PY) scripts/store_notebook.py notebooks/*.ipynb

# The API reference page, generated from the docstrings (book/api.md is not in the repository)
api: setup
	$(PY) scripts/api_reference.py book/api.md

clean:
	rm -rf _build $(VENDOR) node_modules
