# phikit: `make demo` runs the main job on the embedded tiny model, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test test-fast fixture clean

install: $(VENV)/.installed

# torch first (the CPU wheel); anything that asks for plain torch later would pull a CUDA build.
# optimum-intel requires torchvision, which it does not use: remove it and re-pin torch.
$(VENV)/.installed: constraints.txt requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -r requirements.txt
	$(PIP) uninstall -q -y torchvision
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: install
	$(VENV)/bin/phikit demo

# Everything, slow end-to-end builds included.
test: install
	$(PY) -m pytest -q

# The quick loop: no conversions.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Regenerate models/tiny-phi3 and evalsets/tiny-phi3.jsonl (needs npm; ~15 min of CPU).
fixture: install
	$(PY) fixtures/make_tiny_phi3.py

clean:
	rm -rf dist
