PY := .venv/bin/python
MODEL ?= auto
ARGS ?=

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m bridge.cli serve --model $(MODEL) $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) -m bridge.cli bench --arch musicgen-small --seconds 10 --compare transformers $(ARGS)

clean:
	rm -rf .venv .pytest_cache
