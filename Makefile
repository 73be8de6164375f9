# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, answer a question about examples/two_green_stars.png
#   make test   same setup, then ruff, the full test suite and the notebooks (strict nbval) on the
#               newest transformers 5.x, the test suite again on transformers 4.57.x (.venv-tf4), and
#               the Colab rehearsal (.venv-colab: the package from a wheel, each notebook alone)
#
# torch is installed first and on its own, so pip never pulls a CUDA build by accident.
# TORCH names the torch requirement: torch==2.13.0 takes the CPU wheel this project's
# machines keep on disk; elsewhere use what your platform needs (e.g. make TORCH=torch).

PYTHON ?= python3
TORCH ?= torch==2.13.0
TRANSFORMERS_4 ?= transformers==4.57.6
LLAMA_CPP ?= llama-cpp-python==0.3.36
VENV := .venv
VENV_TF4 := .venv-tf4
PYTEST_ARGS ?=

.PHONY: demo test lint test-tf5 test-tf4 test-colab test-llama-cpp llama-cpp test-online notebooks bench bench-llama-cpp mini clean

# Tests never contact the Hub (the online comparison has its own target); notebooks run offline.
OFFLINE := HF_HUB_OFFLINE=1 LLAMA3VISION_BACKEND=auto

# The first environment also gets bitsandbytes (the quant extra), so 4-bit loading is tested on the CPU.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test,notebooks,quant,gguf,llama3-tokenizer]"
	touch $@

$(VENV_TF4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV_TF4)/bin/python -m pip install --quiet -e ".[test,notebooks,gguf,llama3-tokenizer]" "$(TRANSFORMERS_4)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m llama3vision_min ask --image examples/two_green_stars.png "what is this?" --greedy --max-new-tokens 16

test: lint test-tf5 test-tf4 test-colab

# ruff with the project's settings (pyproject.toml: pycodestyle and pyflakes, lines up to 110 characters).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test-tf5: $(VENV)/.installed
	$(VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OFFLINE) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-tf4: $(VENV_TF4)/.installed
	$(VENV_TF4)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OFFLINE) $(VENV_TF4)/bin/python -m pytest tests $(PYTEST_ARGS)  # notebooks store 5.x outputs

# Colab, rehearsed (tests/repo/test_colab.py): a Colab-like environment (.venv-colab: torch and Colab's own kernel
# pins), the setup cell's install from a clean clone of HEAD (commit first), each notebook run alone in that
# kernel on the real backend (fake Hub) and on auto, two at a time. About 5 minutes on 2 cores (3.5 once the
# environment is built: it is kept).
test-colab: $(VENV)/.installed
	LLAMA3VISION_COLAB_REHEARSAL=1 TORCH="$(TORCH)" $(OFFLINE) $(VENV)/bin/python -m pytest -rs tests/repo/test_colab.py $(PYTEST_ARGS)

# llama.cpp itself (llama-cpp-python builds it from source: about 20 minutes on 2 cores the first time; pip
# keeps the built wheel, so later installs take seconds), then the GGUF export checked against it.
llama-cpp: $(VENV)/.installed
	$(VENV)/bin/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/python -m pip install --quiet "$(LLAMA_CPP)"

test-llama-cpp: llama-cpp
	$(OFFLINE) $(VENV)/bin/python -m pytest -rs tests/workshop/test_gguf.py tests/workshop/test_bench.py::test_the_llama_cpp_rows $(PYTEST_ARGS)

# On a machine that reaches the Hugging Face Hub (e.g. Colab): compare with the official remote code.
test-online: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m online -rs tests/parity/test_official_remote.py

# Re-execute every notebook in place (offline backend), so the stored outputs match the code.
notebooks: $(VENV)/.installed
	$(OFFLINE) $(VENV)/bin/python notebooks/execute.py

# Speed and memory, ratios measured in one run (see benchmarks/RESULTS.md).
bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench.py --sizes tiny,medium,real --stage1

# llama.cpp next to ours (GGUF export of the same weights): time to the first token and decode speed.
bench-llama-cpp: llama-cpp
	$(VENV)/bin/python benchmarks/bench.py --sizes "" --llama-cpp

# Retrain the miniature from scratch (all four stages, about 9 minutes on 2 cores) and ship it into the package.
mini: $(VENV)/.installed
	$(VENV)/bin/python -m llama3vision_min.miniature train --stage all --out miniature-run --ship

clean:
	rm -rf $(VENV) $(VENV_TF4) .venv-colab .pytest_cache .hypothesis
