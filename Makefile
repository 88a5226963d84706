# The two commands of the README. Both set up everything on a fresh machine (Python 3.11, pip).
#   make demo   the main job: end to end on a tiny offline model (no GPU, no network)
#   make test   the test suite, on the newest and the oldest supported transformers
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
TRANSFORMERS_LOWEST ?= transformers==5.17.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

$(VENV)-lowest/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)-lowest
	$(VENV)-lowest/bin/pip install -q --upgrade pip
	$(VENV)-lowest/bin/pip install -q $(TORCH)
	$(VENV)-lowest/bin/pip install -q -e ".[test]" "$(TRANSFORMERS_LOWEST)"
	touch $@

.PHONY: setup test demo
setup: $(VENV)/.installed

test: $(VENV)/.installed $(VENV)-lowest/.installed
	$(VENV)/bin/python -m pytest
	$(VENV)-lowest/bin/python -m pytest tests/test_cache.py tests/test_attention.py tests/test_checkpoint.py

demo: $(VENV)/.installed
	$(VENV)/bin/python -m trimkv demo
