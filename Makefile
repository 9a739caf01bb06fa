# All set-up goes into .venv/ at the repo root. torch is pinned: 2.14.1 with
# torchvision 0.29.1 (see README); deepinv is installed beside the pinned torch.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: setup test test-fast serve clean lock

# requirements.lock pins every dependency (the image installs from it too)
$(STAMP): pyproject.toml requirements.lock
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c requirements.lock torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# everything (CI); test-fast leaves out the tests marked slow (server processes, Ray, PostgreSQL,
# browser, image and wheel builds, training, anything over ~5 s) and the GPU ones
test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cuda" tests

serve: $(STAMP)
	.venv/bin/reconserve serve --host $(HOST) --port $(PORT)

# re-pin after changing pyproject.toml's dependencies: resolve afresh in a scratch venv
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q torch==2.14.1 torchvision==0.29.1 && .venv-lock/bin/pip install -q -e '.[dev]'
	{ echo "# Pinned Python dependencies: the versions CI tests and the image ships (pip's -c constraints)."; \
	  echo "# Regenerate after changing pyproject.toml:  make lock"; \
	  .venv-lock/bin/pip freeze --exclude-editable; } > requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf .venv
