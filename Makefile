# `make test` and `make demo` set up .venv (when missing or older than pyproject.toml /
# constraints.txt) with the tested versions, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepeft-installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(BIN)/python samples/demo.py

bench: $(STAMP)
	$(BIN)/python samples/bench_lora.py
	$(BIN)/python samples/bench_generate.py --rounds 16
	$(BIN)/python samples/bench_threads.py --export bench-out/generate/merged
	$(BIN)/python samples/bench_prefill.py --export bench-out/generate/slots

clean:
	rm -rf $(VENV) demo-out bench-out gen-out
