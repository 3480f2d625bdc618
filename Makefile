# `make test` and `make demo` set up .venv (when missing or older than pyproject.toml /
# constraints.txt) with the tested versions, then run. `make test` also sets up .venv-device,
# edgepeft as a device installs it (the runtime, ONNX Runtime's CPU package, onnxruntime-genai;
# no torch), and runs the device tier there on the exports the main suite wrote.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepeft-installed
DEVICE := .venv-device
DEVICE_STAMP := $(DEVICE)/.edgepeft-installed

.PHONY: test test-main test-device demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,gpu,dev]'
	touch $(STAMP)

$(DEVICE_STAMP): pyproject.toml constraints-device.txt
	test -x $(DEVICE)/bin/python || $(PYTHON) -m venv $(DEVICE)
	$(DEVICE)/bin/python -m pip install -q --upgrade pip
	$(DEVICE)/bin/python -m pip install -q -c constraints-device.txt -e '.[cpu]' onnxruntime-genai pytest
	touch $(DEVICE_STAMP)

test: test-main test-device

test-main: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-device: $(DEVICE_STAMP)
	$(DEVICE)/bin/python -m pytest -q -p no:cacheprovider tests_device

demo: $(STAMP)
	$(BIN)/python samples/demo.py

bench: $(STAMP) $(DEVICE_STAMP)
	$(BIN)/python samples/bench_lora.py
	$(BIN)/python samples/bench_generate.py --rounds 16
	$(BIN)/python samples/bench_threads.py --export bench-out/generate/merged
	$(BIN)/python samples/bench_prefill.py --export bench-out/generate/slots
	$(BIN)/python samples/bench_many.py
	$(DEVICE)/bin/python samples/bench_genai.py --export bench-out/generate/slots

clean:
	rm -rf $(VENV) $(DEVICE) build demo-out bench-out gen-out
