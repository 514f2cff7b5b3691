# phikit: `make demo` runs the main job on the embedded tiny model, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# llama.cpp for the GGUF backend: llama-cpp-python's source package, pinned by version and sha256
# in toolkit/data/llama-cpp.pin (phikit reads the same file when it fetches the converter itself).
# Its bindings are compiled from it and its vendored llama.cpp converter (convert_hf_to_gguf.py +
# conversion/ + gguf-py) is unpacked beside the venv, not copied into the repo.
LLAMA_CPP_PIN    := toolkit/data/llama-cpp.pin
LLAMA_CPP_PYTHON := llama_cpp_python-$(shell awk '$$1 == "version" {print $$2}' $(LLAMA_CPP_PIN))
LLAMA_CPP_SHA256 := $(shell awk '$$1 == "sha256" {print $$2}' $(LLAMA_CPP_PIN))
LLAMA_CPP_DIR    := $(VENV)/share/phikit/llama.cpp
# Olive 0.13's ModelBuilder pass (Qualcomm NPU backend) imports a module onnxruntime-genai removed
# after 0.12; the pinned 0.12 release (toolkit/data/olive-genai.pin, which phikit reads when it
# installs it itself) goes into a directory only the Olive subprocess puts on its path, so the
# ONNX backend keeps the 0.18 builder.
OLIVE_GENAI      := $(VENV)/share/phikit/olive-genai
OLIVE_GENAI_VERSION := $(shell awk '$$1 == "version" {print $$2}' toolkit/data/olive-genai.pin)

.PHONY: install llama-cpp olive-genai system-deps demo test test-fast bench bench-full bench-medium fixture matrix clean

install: $(VENV)/.installed

# torch first (the CPU wheel); anything that asks for plain torch later would pull a CUDA build.
# optimum-intel requires torchvision, which it does not use: remove it and re-pin torch.
$(VENV)/.installed: toolkit/data/constraints.txt requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c toolkit/data/constraints.txt -r requirements.txt
	$(PIP) uninstall -q -y torchvision
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps -e .
	$(MAKE) llama-cpp
	$(MAKE) olive-genai
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

# LLAVA_BUILD=OFF: phikit needs the text model only (saves a third of the compile).
llama-cpp:
	rm -rf $(VENV)/share/phikit/src && mkdir -p $(VENV)/share/phikit/src
	$(PIP) download -q --no-deps --no-binary :all: -d $(VENV)/share/phikit/src "llama-cpp-python==$(subst llama_cpp_python-,,$(LLAMA_CPP_PYTHON))"
	echo "$(LLAMA_CPP_SHA256)  $(VENV)/share/phikit/src/$(LLAMA_CPP_PYTHON).tar.gz" | sha256sum -c -
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q -c toolkit/data/constraints.txt $(VENV)/share/phikit/src/$(LLAMA_CPP_PYTHON).tar.gz
	rm -rf $(LLAMA_CPP_DIR) && mkdir -p $(LLAMA_CPP_DIR)
	tar -xzf $(VENV)/share/phikit/src/$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_CPP_DIR) --strip-components=3 \
	  $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
	  $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py $(LLAMA_CPP_PYTHON)/vendor/llama.cpp/LICENSE
	echo "$(LLAMA_CPP_PYTHON) sha256:$(LLAMA_CPP_SHA256)" > $(LLAMA_CPP_DIR)/SOURCE

olive-genai:
	rm -rf $(OLIVE_GENAI)
	$(PIP) install -q --no-deps --target $(OLIVE_GENAI) onnxruntime-genai==$(OLIVE_GENAI_VERSION)

# Debian packages the deploy (OpenSSH server) and aarch64-emulation (qemu, debootstrap) tests use;
# OpenBLAS for MLX's CPU backend on Linux (mlx[cpu] ships netlib's reference BLAS; the MLX runner
# loads an OpenBLAS in its place when there is one: float matmuls tens of times faster).
# qemu-user-static comes from bookworm-backports (10.x): bookworm's 7.2 segfaults loading
# onnxruntime 1.32's aarch64 library. scripts/binfmt-aarch64 registers it with or without systemd
# and fails unless an aarch64 binary really runs.
system-deps:
	mirror=$$(awk '/^URIs:/ && !/security/ {print $$2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null); \
	  test -n "$$mirror" && echo "deb $$mirror bookworm-backports main" > /etc/apt/sources.list.d/phikit-backports.list || true
	apt-get update -q
	apt-get install -y -q openssh-server openssh-client binfmt-support debootstrap chromium \
	  libopenblas0-pthread
	apt-get install -y -q -t bookworm-backports qemu-user-static || apt-get install -y -q qemu-user-static
	sh scripts/binfmt-aarch64

demo: install
	$(VENV)/bin/phikit demo

# Everything, slow end-to-end builds included.
test: install
	$(PY) -m pytest -q -n auto --dist loadgroup

# The quick loop: no conversions.
test-fast: install
	$(PY) -m pytest -q -n auto --dist loadgroup -m "not slow"

# Side-by-side measurements (ratios printed; never timed assertions): bench/record.py runs each
# benchmark, keeps its output in bench/results/ and writes docs/benchmarks.md from those records.
bench: install
	$(PY) bench/record.py

# The full-size (32-layer, 7.6 GB) conversion + end-to-end build of the Performance section.
bench-full: install
	rm -rf /tmp/phikit-ck32
	$(PY) bench/convert.py --layers 32 --keep /tmp/phikit-ck32 --backends gguf,openvino --precisions int4
	$(VENV)/bin/phikit build bench/phi3-mini-shape-int4.yaml --source /tmp/phikit-ck32 --target generic-cpu --backend gguf --out dist/phi3-mini-shape-int4

# Phi-3-medium's shape (40 layers, hidden 5120, 40/10 heads, 14B parameters, 28 GB of bf16; random
# weights made tensor by tensor): each backend's int4 conversion with the peak memory of its
# processes, 8 tokens generated by the artifact, then the bundle built (phikit build: convert,
# bf16 reference on the mapped checkpoint, validate, package); a process tree whose anonymous
# memory passes 22 GB is stopped (24 GB machines). Disk: about 70 GB (the checkpoint, a
# converter's float intermediate, one artifact at a time). Hours on 2 cores.
bench-medium: install
	$(PY) bench/convert.py --shape medium --layers 40 --backends gguf,openvino,onnx --precisions int4 --rss-limit-gb 22 --generate 8 --build bench/phi3-medium-shape-int4.yaml

# Regenerate the embedded fixtures and eval sets (needs npm; ~45 min of CPU). Step counts are
# the ones the shipped models were trained with (deterministic given the step count).
fixture: install
	$(PY) fixtures/make_tiny_phi3.py --steps 350
	$(PY) fixtures/make_tiny_phi3.py --member tiny-phi3-longrope --steps 277
	$(PY) fixtures/make_tiny_phi3.py --member tiny-phi3-gqa --steps 150
	$(PY) fixtures/make_tiny_phi3.py --member tiny-phimoe --steps 120
	$(PY) fixtures/make_tiny_phi3.py --long-context-evalset evalsets/phi3-long-context.jsonl

# docs/family.md's support matrix, regenerated from the backends' own checks (a test keeps it true).
matrix: install
	$(PY) -c "from toolkit.family import update_matrix_doc; update_matrix_doc()"

clean:
	rm -rf dist
