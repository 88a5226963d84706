# The two commands of the README. Both set up everything on a fresh machine (Python 3.11, pip, make).
#   make run    the main job: the offline preset of the Snakemake workflow, end to end (CPU, no network)
#   make test   the test suite on the newest transformers; its core (cache, attention, checkpoints, generate, decode) on the oldest
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
TRANSFORMERS_LOWEST ?= transformers==5.17.0
CORES ?= 2
SNAKEMAKE_ARGS ?=

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

.PHONY: setup run report test test-lowest
setup: $(VENV)/.installed

# The rules call `python -m trimkv`: the venv comes first on PATH.
run: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) $(SNAKEMAKE_ARGS)

report: $(VENV)/.installed
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) $(SNAKEMAKE_ARGS) --report results/report.html

test: $(VENV)/.installed test-lowest
	PATH=$(abspath $(VENV))/bin:$$PATH python -m pytest

test-lowest: $(VENV)-lowest/.installed
	$(VENV)-lowest/bin/python -m pytest tests/test_cache.py tests/test_attention.py tests/test_checkpoint.py \
		tests/test_policies_generate.py tests/test_decode.py
