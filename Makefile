PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo reproduce prep-stdlib test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ds-mtp demo --run-dir runs/demo

reproduce: $(STAMP)
	$(BIN)/ds-mtp reproduce --world usg --seeds 3 --scale cpu --out runs/reproduce-usg --resume

# The whole text pipeline on the standard library's docstrings (see docs/pretraining.md).
prep-stdlib: $(STAMP)
	$(BIN)/ds-mtp prep stdlib-corpus runs/prep/stdlib.jsonl
	$(BIN)/ds-mtp prep tokenizer --input runs/prep/stdlib.jsonl --out runs/prep/tok --vocab-size 4000 --overwrite
	$(BIN)/ds-mtp prep shard --input runs/prep/stdlib.jsonl --tokenizer runs/prep/tok --out runs/prep/data \
		--workers 2 --val-fraction 0.05 --overwrite
	$(BIN)/ds-mtp prep verify runs/prep/data

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not multiprocess and not slow"

clean:
	rm -rf $(VENV) runs
