PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := .make

.PHONY: install demo test lint bench clean

$(STAMP)/installed: pyproject.toml
	$(PIP) install -q -e '.[dev]'
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/installed

$(STAMP)/system:
	bash .ci/system-deps.sh
	@mkdir -p $(STAMP) && touch $@

demo: $(STAMP)/installed
	$(PYTHON) -m flowtrace.cli demo --host $(HOST) --port $(PORT)

test: $(STAMP)/system $(STAMP)/installed
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)/installed
	ruff check .
	mypy

bench: $(STAMP)/installed
	$(PYTHON) -m benchmarks.run

clean:
	rm -rf $(STAMP)
