# Two entry points for a new user: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml constraints-dev.txt package.json package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints-dev.txt torch==2.13.0
	$(PIP) install -q -c constraints-dev.txt -e '.[test]'
	npm ci --no-audit --no-fund --loglevel=error   # the web viewer's splat renderer (served by pipelines.serve)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipelines.generate --config deploy/generate.yaml

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
