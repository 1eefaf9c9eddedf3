# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Each does its own setup: a virtual environment in .venv with the project installed from
# pyproject.toml, with the extras that command needs (torch from the local wheel cache where
# pip finds one). `make docs` builds the site, `make readme-figures` regenerates the README's figures.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Betty, the peer library mlo is measured against and whose engine runs mlo programs
# (mlo.engines.betty). betty-ml 0.2.1 declares Requires-Python <3.11 in its metadata although its
# code runs on 3.11, so pip on 3.11 would silently pick the old 0.1.1 instead. Install the release
# we compare against while ignoring that marker; --no-deps because its only dependencies, torch
# and numpy, are already installed by the project and must not be re-resolved (pip could
# otherwise replace the torch build).
BETTY := betty-ml==0.2.1
BETTY_INSTALL := $(BIN)/python -m pip install --quiet --ignore-requires-python --no-deps $(BETTY)
# Each command's extras, installed once per change of pyproject.toml (a stamp file per set).
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
DOCS_STAMP := $(VENV)/.installed-docs
PEERS_STAMP := $(VENV)/.installed-peers

.PHONY: demo test docs readme-figures readme-figures-check install peers data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel

# the bundled programs: torchvision, scikit-learn, scipy, matplotlib
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[programs]"
	touch $@

# what the tests exercise: the programs, TensorBoard logs, the test tools and Betty's engine
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[programs,logs,test]"
	$(BETTY_INSTALL)
	touch $@

$(DOCS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

# The peers of the speed benchmarks: higher and TorchOpt (the "bench" extra) and Betty.
$(PEERS_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[programs,bench]"
	$(BETTY_INSTALL)
	touch $@

install: $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/mlo run lfm-cw

test: $(TEST_STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

# The site of README.md and docs/ with the API reference, built offline into site/; --strict
# fails on a broken link or reference.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --quiet --site-dir site

# Every figure the README quotes, recomputed at this commit (results.json records torch, commit
# and machine); readme-figures-check lists the figures that differ without rewriting anything.
readme-figures: $(TEST_STAMP)
	$(BIN)/python benchmarks/readme_figures.py

readme-figures-check: $(TEST_STAMP)
	$(BIN)/python benchmarks/readme_figures.py --check

peers: $(PEERS_STAMP)

# Fashion-MNIST (`mlo run --dataset fashion-mnist`): Debian's package puts its four IDX files in
# /usr/share/datasets/fashion-mnist, where the loader looks (it asks `dpkg -L`). Nothing else here
# downloads; elsewhere pass --data-root DIR with the four files.
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then echo "dataset-fashion-mnist is installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist; else sudo apt-get install -y dataset-fashion-mnist; fi; \
	else echo "no apt-get here: put the four Fashion-MNIST IDX files in a folder and pass --data-root DIR"; exit 1; fi

clean:
	rm -rf $(VENV) build dist site *.egg-info
