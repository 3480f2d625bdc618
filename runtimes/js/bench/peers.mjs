// The JavaScript peers of samples/bench_web.py, driven over stdin/stdout (one JSON object a line).
//
//   ADAPTERS=a,b node bench/peers.mjs OUT REPO PORT    (OUT: a path under REPO, which serve.py serves on PORT)
//
// Opens the export in onnxruntime-node, in onnxruntime-web's wasm build (1 thread: Node has no
// cross-origin isolation) and in the sample page in headless Chromium (wasm, 2 threads), timing each
// load; prints {"ready": {...}}. Then each line {"peer", "ids", "mask", "adapters", "calls"} runs `calls`
// forward calls on that peer, the adapter cycling through `adapters`, and prints the ms of each call.
import { readdirSync, readFileSync } from "node:fs";
import path from "node:path";
import { createInterface } from "node:readline";

import * as ortNode from "onnxruntime-node";
import * as ortWeb from "onnxruntime-web";
import { chromium } from "playwright-core";

import { openFolder } from "../src/node.js";

const [out, repo, port] = process.argv.slice(2);
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
ortWeb.env.wasm.numThreads = 1;

function parentOf(pid) {
  try {
    return Number(/PPid:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
  } catch { return 0; }  // the process ended
}

function ours(pid) {  // a process this one started, at any depth: another user's Chromium on the host is not counted
  for (let p = parentOf(pid); p > 1; p = parentOf(p)) if (p === process.pid) return true;
  return false;
}

function rendererRss() {  // resident memory of this run's Chromium page processes (Linux /proc), MiB
  let kib = 0;
  for (const pid of readdirSync("/proc").filter((n) => /^\d+$/.test(n))) {
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("--type=renderer") || !ours(Number(pid))) continue;
      kib += Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
    } catch { /* the process ended */ }
  }
  return kib / 1024;
}

async function timedLoad(fn) {
  const t = performance.now();
  const value = await fn();
  return [value, performance.now() - t];
}

async function loadNode(ort, names) {
  return timedLoad(async () => {
    const rt = await openFolder(ort, path.join(repo, out));
    for (const n of names) await rt.loadAdapter(n);
    return rt;
  });
}

async function main() {
  const names = process.env.ADAPTERS.split(",");
  const rssBefore = process.memoryUsage().rss;
  const [node, nodeMs] = await loadNode(ortNode, names);
  const nodeRss = process.memoryUsage().rss - rssBefore;
  const [wasm, wasmMs] = await loadNode(ortWeb, names);

  const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS });
  const page = await browser.newPage();
  const downloads = {};
  page.on("requestfinished", async (request) => {
    const sizes = await request.sizes();
    downloads[new URL(request.url()).pathname] = sizes.responseBodySize;
  });
  const emptyRss = rendererRss();
  await page.goto(`http://127.0.0.1:${port}/samples/web/?out=${encodeURIComponent(`/${out}`)}&adapters=${encodeURIComponent(names.join(","))}&ep=wasm`);
  await page.waitForFunction(() => window.edgepeft || document.getElementById("status").textContent.startsWith("error"),
    null, { timeout: 300000 });
  const page_ = await page.evaluate(() => ({ loadMs: window.edgepeft?.loadMs, threads: window.edgepeft?.threads,
    status: document.getElementById("status").textContent }));
  if (page_.status !== "ready") throw new Error(`the page: ${page_.status}`);

  const peers = {
    node: (ids, mask, adapter) => node.forward(ids, mask, { adapter }),
    wasm: (ids, mask, adapter) => wasm.forward(ids, mask, { adapter }),
  };
  console.log(JSON.stringify({ ready: {
    node: { loadMs: nodeMs, rssMiB: nodeRss / 2 ** 20 },
    wasm: { loadMs: wasmMs },
    chromium: { loadMs: page_.loadMs, threads: page_.threads, rendererMiB: rendererRss(), emptyRendererMiB: emptyRss },
    downloads,
  } }));

  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const { peer, ids, mask, adapters, calls } = JSON.parse(line);
    let ms;
    if (peer === "chromium") {
      ms = await page.evaluate(async ({ ids, mask, adapters, calls }) => {
        const times = [];
        for (let i = 0; i < calls; i++) {
          const t = performance.now();
          await window.edgepeft.rt.forward(ids, mask, { adapter: adapters[i % adapters.length] });
          times.push(performance.now() - t);
        }
        return times;
      }, { ids, mask, adapters, calls });
    } else {
      ms = [];
      for (let i = 0; i < calls; i++) {
        const t = performance.now();
        await peers[peer](ids, mask, adapters[i % adapters.length]);
        ms.push(performance.now() - t);
      }
    }
    console.log(JSON.stringify({ ms }));
  }
  await browser.close();
}

main().catch((e) => { console.error(e.stack || String(e)); process.exit(1); });
