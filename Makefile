# The README's commands. `make lab` to learn, `make test` to check everything.
PYTHON ?= python3
VENV ?= .venv
LOWEST ?= .venv-lowest
# On the course machines this pin takes a local CPU wheel; elsewhere pip picks the build
# for your platform (the CUDA build on Linux). Override: make lab TORCH=torch==2.11.0
TORCH ?= torch==2.13.0
LOWEST_TRANSFORMERS ?= transformers==5.17.0
PIP = -m pip install -q --disable-pip-version-check

.PHONY: lab test unit notebooks bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python $(PIP) "$(TORCH)"
	$(VENV)/bin/python $(PIP) -e ".[dev]"
	touch $@

# A second environment with transformers pinned to the lowest version we declare.
$(LOWEST)/.installed: pyproject.toml
	test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python $(PIP) "$(TORCH)"
	$(LOWEST)/bin/python $(PIP) -e . "$(LOWEST_TRANSFORMERS)" "pytest>=8"
	touch $@

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

unit: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests -q

notebooks: $(VENV)/.installed
	$(VENV)/bin/python -m pytest --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks -q

test: $(VENV)/.installed $(LOWEST)/.installed
	$(VENV)/bin/python -m pytest tests -q
	$(VENV)/bin/python -m pytest --nbval-lax --nbval-sanitize-with notebooks/sanitize.cfg notebooks -q
	@echo "== unit tests again with $(LOWEST_TRANSFORMERS) =="
	$(LOWEST)/bin/python -m pytest tests -q

bench: $(VENV)/.installed
	$(VENV)/bin/python -m moelab.bench   # the full benchmark on the CPU (tiny, fp32 + NF4); see the README for CUDA

clean:
	rm -rf $(VENV) $(LOWEST)
