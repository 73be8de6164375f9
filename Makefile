# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, answer a question about examples/red_circle.png
#   make test   same setup, then the full test suite on the newest transformers 5.x
#               and again on transformers 4.57.x (in .venv-tf4)
#
# torch is installed first and on its own, so pip never pulls a CUDA build by accident.
# TORCH names the torch requirement: torch==2.13.0 takes the CPU wheel this project's
# machines keep on disk; elsewhere use what your platform needs (e.g. make TORCH=torch).

PYTHON ?= python3
TORCH ?= torch==2.13.0
TRANSFORMERS_4 ?= transformers==4.57.6
VENV := .venv
VENV_TF4 := .venv-tf4
PYTEST_ARGS ?=

.PHONY: demo test test-tf5 test-tf4 test-online clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

$(VENV_TF4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV_TF4)
	$(VENV_TF4)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV_TF4)/bin/python -m pip install --quiet -e ".[test]" "$(TRANSFORMERS_4)"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m llama3vision_min ask --image examples/red_circle.png "what is this?" --greedy --max-new-tokens 16

test: test-tf5 test-tf4

test-tf5: $(VENV)/.installed
	$(VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-tf4: $(VENV_TF4)/.installed
	$(VENV_TF4)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(VENV_TF4)/bin/python -m pytest $(PYTEST_ARGS)

# On a machine that reaches the Hugging Face Hub (e.g. Colab): compare with the official remote code.
test-online: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -m online -rs tests/test_official_remote.py

clean:
	rm -rf $(VENV) $(VENV_TF4) .pytest_cache .hypothesis
