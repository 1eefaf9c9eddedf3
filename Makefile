# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Each does its own setup: a virtual environment in .venv with the project installed from
# pyproject.toml (torch from the local wheel cache where pip finds one).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Betty, the peer library mlo is measured against and whose engine runs mlo programs
# (mlo.engines.betty). betty-ml 0.2.1 declares Requires-Python <3.11 in its metadata although its
# code runs on 3.11, so pip on 3.11 would silently pick the old 0.1.1 instead. Install the release
# we compare against while ignoring that marker; --no-deps because its only dependencies, torch
# and numpy, are already installed by the project and must not be re-resolved (pip could
# otherwise replace the torch build).
BETTY := betty-ml==0.2.1
BETTY_INSTALL := $(BIN)/pip install --quiet --ignore-requires-python --no-deps $(BETTY)

.PHONY: demo test install peers data clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=23" "setuptools>=68" wheel
	$(BIN)/pip install --quiet -e ".[test]"
	$(BETTY_INSTALL)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mlo run lfm-cw

test: $(STAMP)
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The peers of the speed benchmarks: higher and TorchOpt (the "bench" extra) and Betty.
peers: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BETTY_INSTALL)

# Fashion-MNIST (`mlo run --dataset fashion-mnist`): Debian's package puts its four IDX files in
# /usr/share/datasets/fashion-mnist, where the loader looks (it asks `dpkg -L`). Nothing else here
# downloads; elsewhere pass --data-root DIR with the four files.
data:
	@if dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then echo "dataset-fashion-mnist is installed"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist; else sudo apt-get install -y dataset-fashion-mnist; fi; \
	else echo "no apt-get here: put the four Fashion-MNIST IDX files in a folder and pass --data-root DIR"; exit 1; fi

clean:
	rm -rf $(VENV) build dist *.egg-info
