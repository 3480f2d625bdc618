// The sample page: an edgepeft export served over HTTP, a task menu, text in, the task's answer out.
//   ?out=/demo-out/export&adapters=intent,sentiment   (the defaults: what `make demo` writes)
//   &ep=webgpu|wasm   ONNX Runtime's execution provider; default: WebGPU where the browser offers an adapter
//   &proxy=1          wasm in onnxruntime-web's proxy worker (env.wasm.proxy): the page stays responsive during a call
import { classify } from "/runtimes/js/src/runtime.js";
import { loadTokenizer, openUrl } from "/runtimes/js/src/web.js";

const params = new URLSearchParams(location.search);
const out = params.get("out") || "/demo-out/export";
const names = (params.get("adapters") || "intent,sentiment").split(",");
const $ = (id) => document.getElementById(id);

async function main() {
  const t0 = performance.now();
  const gpu = params.get("ep") === "wasm" ? null : await navigator.gpu?.requestAdapter().catch(() => null);
  const ep = params.get("ep") || (gpu ? "webgpu" : "wasm");
  if (ep === "webgpu" && !gpu) {  // ONNX Runtime's own error blamed the session options
    throw new Error("this browser offers no WebGPU adapter (navigator.gpu); open the page with &ep=wasm");
  }
  // each build fetches its own wasm binary: the wasm-only one is half the size of the WebGPU one
  const ort = await import(ep === "webgpu" ? "onnxruntime-web/webgpu" : "onnxruntime-web/wasm");
  ort.env.wasm.wasmPaths = "/runtimes/js/node_modules/onnxruntime-web/dist/";
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(2, navigator.hardwareConcurrency || 1) : 1;
  ort.env.wasm.proxy = params.get("proxy") === "1";
  const rt = await openUrl(ort, out, { sessionOptions: { executionProviders: [ep] } });
  for (const name of names) await rt.loadAdapter(name);
  const tokenizer = await loadTokenizer(out);
  const loadMs = performance.now() - t0;
  for (const name of names) $("task").add(new Option(name, name));
  $("status").textContent = "ready";
  const where = ep === "webgpu" ? "WebGPU" : `wasm, ${ort.env.wasm.numThreads} threads`;
  $("timing").textContent = `loaded in ${loadMs.toFixed(0)} ms (${where})`;
  $("run").disabled = false;
  window.edgepeft = { rt, loadMs, ep, threads: ort.env.wasm.numThreads, proxy: ort.env.wasm.proxy };  // for the page test and samples/bench_web.py

  $("run").onclick = async () => {
    const adapter = $("task").value;
    const ids = [tokenizer.encode($("text").value).ids];
    const mask = [ids[0].map(() => 1)];
    const t = performance.now();
    if (rt.cache) {  // a decoder: generated text
      const generated = await rt.generate(ids, mask, { adapter, maxNewTokens: 16 });
      $("result").textContent = tokenizer.decode(generated[0].slice(ids[0].length), { skip_special_tokens: true });
    } else {
      const [top] = classify((await rt.forward(ids, mask, { adapter })).logits, rt.labels(adapter), 0, rt.problemType);
      $("result").textContent = `${top.label} (${top.score.toFixed(3)})`;
      $("result").dataset.label = top.label;
      $("result").dataset.score = top.score;
    }
    const ms = performance.now() - t;
    $("result").dataset.task = adapter;
    $("result").dataset.ms = ms;
    $("result").dataset.calls = Number($("result").dataset.calls || 0) + 1;
    $("timing").textContent = `${adapter}: ${ms.toFixed(1)} ms; loaded in ${loadMs.toFixed(0)} ms (${where})`;
  };
}

main().catch((e) => { $("status").textContent = `error: ${e.message}`; });
