# `make run`: set everything up on a fresh machine and open the dashboard.
# `make test`: the same set-up, then the whole test suite (what CI runs), on TEST_WORKERS xdist workers;
#   the load-sensitive modules share one worker (conftest.py's LOAD_SENSITIVE, --dist loadgroup).
PYTHON_BOOT ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PORT        ?= 8501
TEST_WORKERS ?= 2
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: run test setup data browser bench clean-venv

run: setup
	$(PY) -m streamlit run dashboard/app.py --server.port $(PORT)

test: setup browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

setup: $(VENV)/.runtime data

$(VENV)/.runtime: requirements.txt
	[ -x $(PY) ] || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.test: requirements-test.txt $(VENV)/.runtime
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

# FashionMNIST: Debian's package where apt exists, else torchvision's download (needs internet).
data: $(VENV)/.runtime
	@if [ ! -f $(DEBIAN_FASHION) ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi
	$(PY) -m core data --dataset fashion_mnist

# Headless Chromium for the browser journey: Debian's package, never a downloaded browser.
browser: $(VENV)/.test
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

bench: setup
	$(PY) -m core bench

clean-venv:
	rm -rf $(VENV)
