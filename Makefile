# Two commands a new user needs: `make demo` and `make test`. Each creates .venv if needed.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,ray,track]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pilelm demo

# The browser test drives Debian's chromium (a fresh machine lacks it).
browser:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# pytest exits 5 when it collects no test; make treats that as the failure it is.
test: $(STAMP) browser
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pilelm tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,ray,track,bench]'
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache runs
