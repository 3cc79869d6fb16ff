# Two commands do all set-up on a fresh machine:
#   make demo   -- offline end-to-end demo on the shipped models
#   make test   -- the test suite (what CI runs)
VENV ?= .venv
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-ci.txt tools/fetch_llama_converter.py | cksum | cut -d' ' -f1)

$(STAMP): pyproject.toml requirements-ci.txt tools/fetch_llama_converter.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned (an unpinned torch pulls CUDA packages); where pip's own index would
	# serve the CUDA build, `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU one
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -r requirements-ci.txt
	$(PIP) install -q -e '.[dev]'
	# llama.cpp's own HF -> GGUF converter (from llama-cpp-python's source package), the reference
	# tests/test_gguf.py compares our GGUF export with
	$(PY) tools/fetch_llama_converter.py
	rm -f $(VENV)/.installed-*
	touch $@

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mamba-deploy demo

test: $(STAMP)
	# again here (instant once fetched): a fetch that failed at install is retried, not skipped for good
	$(PY) tools/fetch_llama_converter.py
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/cpu_forward.py
