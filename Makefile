# `make test` and `make demo` set up .venv (when missing or older than pyproject.toml /
# constraints.txt) with the tested versions, then run. `make test` also sets up .venv-device,
# edgepeft as a device installs it (the runtime, ONNX Runtime's CPU package, onnxruntime-genai;
# no torch), and runs the device tier there on the exports the main suite wrote, then the
# JavaScript runtime's tests (Node.js, and the sample page in headless Chromium) on the exports
# it wrote to build/js. Node.js, npm and Chromium come from Debian's packages when missing; where that node is older
# than 20 (Debian 12's is 18; playwright-core needs 20), the npm registry's node@22 goes into .node, first on PATH.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgepeft-installed
DEVICE := .venv-device
DEVICE_STAMP := $(DEVICE)/.edgepeft-installed
GENAI := .venv-genai
GENAI_STAMP := $(GENAI)/.edgepeft-installed
JS := runtimes/js
JS_STAMP := $(JS)/node_modules/.edgepeft-installed
# the node every recipe runs (npm's too) where .node holds one: node_modules/.bin of `npm install --prefix .node node@22`
NODE_DIR := .node
export PATH := $(CURDIR)/$(NODE_DIR)/node_modules/.bin:$(PATH)
NODE_20 := node -e 'process.exit(process.versions.node.split(".")[0] < 20 ? 1 : 0)'
CHROMIUM ?= /usr/bin/chromium
# make web PORT=8001 where port 8000 is taken
PORT = 8000
APT := $(if $(filter 0,$(shell id -u)),,sudo )apt-get
# torch's CPU build: PyPI's Linux torch 2.13.0 is the CUDA build (multi-GB, NVIDIA libraries), so PyTorch's CPU index
# is added where it answers; a host that cannot reach it takes torch from its own pip configuration (a mirror)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FROM = $(shell $(PYTHON) -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
	$(TORCH_CPU_INDEX) 2>/dev/null && echo --extra-index-url $(TORCH_CPU_INDEX))

.PHONY: test test-main test-device test-js demo web bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, the CPU build (TORCH_FROM)
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_FROM) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,gpu,dev]'
	touch $(STAMP)

$(DEVICE_STAMP): pyproject.toml constraints-device.txt
	test -x $(DEVICE)/bin/python || $(PYTHON) -m venv $(DEVICE)
	$(DEVICE)/bin/python -m pip install -q --upgrade pip
	$(DEVICE)/bin/python -m pip install -q -c constraints-device.txt -e '.[cpu]' onnxruntime-genai pytest
	touch $(DEVICE_STAMP)

# onnxruntime-genai's own pipeline for samples/bench_genai_builder.py: its model builder needs torch and
# transformers beside genai, and genai brings the CPU onnxruntime (never beside onnxruntime-gpu)
$(GENAI_STAMP): pyproject.toml constraints.txt
	test -x $(GENAI)/bin/python || $(PYTHON) -m venv $(GENAI)
	$(GENAI)/bin/python -m pip install -q --upgrade pip
	$(GENAI)/bin/python -m pip install -q -c constraints.txt $(TORCH_FROM) torch==2.13.0
	$(GENAI)/bin/python -m pip install -q -c constraints.txt -e '.[train,cpu]' peft onnxruntime onnxruntime-genai
	touch $(GENAI_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	command -v node >/dev/null && command -v npm >/dev/null || { $(APT) update -q && $(APT) install -y -q nodejs npm; }
	$(NODE_20) || npm install --prefix $(NODE_DIR) --no-audit --no-fund node@22
	$(NODE_20) || { echo "error: $$(command -v node) is Node.js $$(node --version); playwright-core needs 20 or newer" >&2; exit 1; }
	test -x $(CHROMIUM) || { $(APT) update -q && $(APT) install -y -q chromium; }
	# onnxruntime-node's install script would fetch CUDA libraries from outside the registry: skipped
	cd $(JS) && npm ci --no-audit --no-fund --onnxruntime-node-install=skip
	touch $(JS_STAMP)

# one after the other, also under make -j: the device and JavaScript tiers read the exports the main suite writes
test:
	$(MAKE) test-main
	$(MAKE) test-device
	$(MAKE) test-js

test-main: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-device: $(STAMP) $(DEVICE_STAMP)
	test -f build/device/expected.json || $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_device_fixtures.py
	$(DEVICE)/bin/python -m pytest -q -p no:cacheprovider tests_device

test-js: $(STAMP) $(JS_STAMP)
	test -f build/js/expected.json || $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_js_fixtures.py
	cd $(JS) && EDGEPEFT_JS_FIXTURES='$(CURDIR)/build/js' PYTHON='$(CURDIR)/$(BIN)/python' CHROMIUM='$(CHROMIUM)' node --test test/*.test.js

demo: $(STAMP)
	$(BIN)/python samples/demo.py

# the demo's export (make demo) in the sample page: open http://localhost:$(PORT)/samples/web/
web: $(STAMP) $(JS_STAMP)
	test -f demo-out/export/base/edgepeft.json || $(BIN)/python samples/demo.py
	$(BIN)/python samples/web/serve.py --port $(PORT)

bench: $(STAMP) $(DEVICE_STAMP) $(JS_STAMP) $(GENAI_STAMP)
	$(BIN)/python samples/bench_lora.py
	$(BIN)/python samples/bench_generate.py --rounds 16
	$(BIN)/python samples/bench_threads.py --export bench-out/generate/merged
	$(BIN)/python samples/bench_prefill.py --export bench-out/generate/slots
	$(BIN)/python samples/bench_many.py
	$(DEVICE)/bin/python samples/bench_genai.py --export bench-out/generate/slots
	$(GENAI)/bin/python samples/bench_genai_builder.py
	$(BIN)/python samples/bench_lora_kernels.py
	$(BIN)/python samples/bench_lora_layouts.py --export bench-out/generate/slots-int4
	$(BIN)/python samples/bench_lora_layouts.py --export bench-out/generate/slots
	$(BIN)/python samples/bench_ops.py
	$(BIN)/python samples/bench_web.py
	$(BIN)/python samples/bench_web.py --quantize int8 --out bench-out/web-int8

clean:
	rm -rf $(VENV) $(DEVICE) $(GENAI) $(JS)/node_modules $(NODE_DIR) build demo-out bench-out gen-out quant-out pairs-out training-defaults-work
