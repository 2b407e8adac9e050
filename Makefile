PY := .venv/bin/python
MODEL ?= auto
ARGS ?=
TRACK ?= lead
PRESET ?= jazz_piano

.PHONY: setup run jam test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(PY) -m bridge.cli serve --model $(MODEL) $(ARGS)

# In a second terminal while `make run` serves: a jam on TRACK with PRESET's sound and chain.
jam:
	$(PY) -m bridge.cli send /track/$(TRACK)/preset $(PRESET)
	$(PY) -m bridge.cli send /jam/start $(TRACK)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) -m bridge.cli bench --arch musicgen-small --seconds 10 --compare transformers $(ARGS)

clean:
	rm -rf .venv .pytest_cache
