# All set-up goes into .venv/ at the repo root. torch is pinned: 2.14.1 with
# torchvision 0.29.1 (see README); deepinv is installed beside the pinned torch.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: setup test serve clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

serve: $(STAMP)
	.venv/bin/reconserve serve --host $(HOST) --port $(PORT)

clean:
	rm -rf .venv
