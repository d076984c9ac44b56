# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --quiet --disable-pip-version-check

.PHONY: demo test bench clean

$(VENV)/.demo: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -e .
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.demo
	$(PIP) install -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3  # notebook tests: kernel python3 = this venv's python
	# report screenshot test: Debian's chromium where apt-get exists; elsewhere that one test skips, saying why
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

demo: $(VENV)/.demo  ## install, then run the embedded default sweep (digits, CPU, local Ray)
	$(PY) -m orchestrator.sweep

test: $(VENV)/.test  ## install with test extras, lint, then run the whole suite
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15  # Ray tests in one worker, the rest beside them (tests/conftest.py); the slowest 15 (docs/development.md)

bench: $(VENV)/.test
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) results
