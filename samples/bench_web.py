"""The JavaScript runtime against the Python runtime on one export: load time, memory, ms per call, page downloads.

    python samples/bench_web.py [--out bench-out/web] [--rounds 12] [--calls 20] [--quantize int8]

Needs runtimes/js/node_modules and Chromium (`make test` installs both). Model: the real MiniLM-L6 with 4 LoRA
r 8 classifiers (HF PEFT, random B; bench_many.py's), exported once. Peers, each switching adapter every call,
batch 1, one sentence: the Python runtime (onnxruntime, CPU), onnxruntime-node, onnxruntime-web's wasm build in
Node (1 thread) and the sample page in headless Chromium (wasm, 2 threads with the page's COOP/COEP headers).
Peers take turns in blocks of ``--calls`` calls, in a new seeded random order each round; each block's first
3 calls are dropped; medians and ratios to the Python runtime. Load time: opening the export until every
adapter is staged (the page: also the tokenizer). Memory: resident memory the Python and Node processes gained
by loading, and Chromium's page processes after loading (and on an empty page). Downloads: the bytes the page
fetched, by file.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from sample_folder import REPO, fresh_folder, positive, run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_many import ADAPTERS, make_adapters  # noqa: E402

JS = os.path.join(REPO, "runtimes", "js")
# the Node.js that make installs into .node where the system's is older than 20 (playwright-core's need), else PATH's
NODE = os.path.join(REPO, ".node", "node_modules", ".bin", "node")
NODE = NODE if os.path.exists(NODE) else "node"
DROP = 3
TEXT = "could you put milk on my list"


def serve():
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "samples", "web", "serve.py"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    said = server.stdout.readline()  # "serving REPO at http://127.0.0.1:PORT/samples/web/" (REPO may hold "at ")
    if not (found := re.search(r"http://[^/\s]+:(\d+)/samples/web/", said)):
        server.kill()
        sys.exit("error: samples/web/serve.py did not start (its error is above)")
    return server, found[1]


def python_load(export_dir) -> dict:
    """Runtime(OUT)'s time and the memory it adds, in a fresh process (this one's heap already holds the export's)."""
    code = ("import json, sys, time; from edgepeft.runtimes import Runtime; from edgepeft.runtimes.bench import rss_bytes\n"
            "before = rss_bytes(); t = time.perf_counter(); rt = Runtime(sys.argv[1])\n"
            "print(json.dumps({'loadMs': (time.perf_counter() - t) * 1e3, 'rssMiB': (rss_bytes() - before) / 2 ** 20}))")
    return json.loads(subprocess.run([sys.executable, "-c", code, export_dir], check=True, capture_output=True, text=True).stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench-out/web")
    ap.add_argument("--rounds", type=positive, default=12)
    ap.add_argument("--calls", type=positive, default=20)
    ap.add_argument("--quantize", choices=["int8", "int4"], help="export the base quantized (default: float32)")
    args = ap.parse_args()
    if args.calls <= DROP:
        sys.exit(f"--calls must be more than {DROP}: each block's first {DROP} calls are dropped")
    out = os.path.abspath(args.out)
    export_path = os.path.relpath(os.path.join(out, "export"), REPO)
    if export_path.startswith(".."):  # checked before --out is emptied
        sys.exit(f"error: --out must lie inside {REPO}: the page reads the export from the repository's server")
    if odd := sorted(set("#?%") & set(export_path)):  # a URL's path reads them otherwise: the page fetched elsewhere
        sys.exit(f"error: --out {args.out}: holds {' '.join(odd)}, which the page's URLs read otherwise; give another folder")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")  # as runtimes/js/bench/peers.mjs finds it
    if not os.path.isfile(chromium):  # the page's peer failed at the end (a JSONDecodeError traceback)
        sys.exit(f"error: {chromium}: missing; install Chromium (make test does: apt-get install chromium), or set "
                 "CHROMIUM to its path")
    if not os.path.isdir(os.path.join(JS, "node_modules")):
        sys.exit(f"{JS}/node_modules is missing: run `make test-js` (or `cd runtimes/js && npm ci`) first")
    fresh_folder(out, ap.get_default("out"))
    dirs = make_adapters(edgepeft.minilm_path(), "seq-cls", os.path.join(out, "adapters-src"), ["query", "value"], 8, 3)
    export(list(dirs.values()), os.path.join(out, "export"), names=ADAPTERS, quantize=args.quantize)

    loads = {"python": python_load(os.path.join(out, "export"))}
    rt = Runtime(os.path.join(out, "export"))
    ids, mask = rt.tokenizer.encode([TEXT])
    switch = {"n": 0}

    def python_block(calls):
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            rt.forward(ids, mask, adapter=ADAPTERS[switch["n"] % len(ADAPTERS)])
            times.append((time.perf_counter() - t) * 1e3)
            switch["n"] += 1
        return times

    server, port, js = *serve(), None
    try:  # the server stopped however this ends (it was left running where node was missing or failed)
        js = subprocess.Popen([NODE, "bench/peers.mjs", export_path, REPO, port], cwd=JS, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "ADAPTERS": ",".join(ADAPTERS)})
        if not (line := js.stdout.readline()):  # its error is above: not a JSONDecodeError of nothing
            sys.exit("error: the JavaScript peers (runtimes/js/bench/peers.mjs) stopped before they were ready; their "
                     "error is above")
        ready = json.loads(line)["ready"]
        loads.update({k: ready[k] for k in ("node", "wasm", "chromium")})
        request = {"ids": ids.tolist(), "mask": mask.tolist(), "adapters": ADAPTERS, "calls": args.calls}

        def js_block(peer):
            js.stdin.write(json.dumps({**request, "peer": peer}) + "\n")
            js.stdin.flush()
            return json.loads(js.stdout.readline())["ms"]

        peers = {"python": lambda: python_block(args.calls), **{p: (lambda p=p: js_block(p)) for p in ("node", "wasm", "chromium")}}
        times = {k: [] for k in peers}
        order = random.Random(0)
        for _ in range(args.rounds):
            for name in order.sample(list(peers), len(peers)):
                times[name] += peers[name]()[DROP:]
    finally:
        if js is not None:
            js.stdin.close()
            js.wait(timeout=60)
        server.terminate()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"MiniLM-L6 ({args.quantize or 'float32'} base), {len(ADAPTERS)} LoRA classifiers, batch 1 x {ids.shape[1]} tokens, adapter switched every call; "
          f"{args.rounds} rounds x {args.calls - DROP} calls per peer")
    print(f"{'peer':34} {'ms/call':>8} {'vs python':>9} {'load ms':>8}")
    labels = {"python": "Python runtime (onnxruntime)", "node": "onnxruntime-node",
              "wasm": "onnxruntime-web wasm in Node, 1 thr", "chromium": f"Chromium page, wasm {loads['chromium']['threads']} threads"}
    for k in peers:
        print(f"{labels[k]:34} {med[k]:8.2f} {med[k] / med['python']:8.2f}x {loads[k]['loadMs']:8.0f}")
    print(f"memory gained by loading: Python {loads['python']['rssMiB']:.0f} MiB, Node (onnxruntime-node) "
          f"{loads['node']['rssMiB']:.0f} MiB; Chromium page processes {loads['chromium']['rendererMiB']:.0f} MiB "
          f"loaded ({loads['chromium']['emptyRendererMiB']:.0f} MiB before the page)")
    downloads = ready["downloads"]
    print(f"the page downloaded {sum(downloads.values()) / 1e6:.1f} MB:")
    for name, size in sorted(downloads.items(), key=lambda kv: -kv[1]):
        if size >= 10_000:
            print(f"  {size / 1e6:7.2f} MB  {name.replace('/' + export_path, 'OUT')}")
    print(f"  {sum(s for s in downloads.values() if s < 10_000) / 1e3:7.1f} kB  in {sum(s < 10_000 for s in downloads.values())} "
          "smaller files (page, scripts, manifests, adapters' JSON)")


if __name__ == "__main__":
    run(main)
