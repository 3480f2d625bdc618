// The sample page (samples/web) in headless Chromium (Debian's package, driven by playwright-core): it loads the
// MiniLM export once, switches task without reloading, and shows the Python runtime's answer for every text,
// on wasm and on WebGPU (Chromium's SwiftShader adapter: WebGPU on the CPU, the same code path a GPU takes).
// Saves a screenshot and the page's load and call times to build/js/.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import path from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// Offline machine: no background traffic, no GPU, no sandbox (root), a fresh profile.
const FLAGS = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const EPS = {  // name: the page's execution provider (ep, else the name), its other parameters, Chromium's flags
  wasm: { flags: ["--disable-gpu"], tolerance: 1e-4 },
  // onnxruntime-web's proxy worker takes each input's buffer: the tensors kept between calls go as copies
  "wasm-proxy": { ep: "wasm", query: "&proxy=1", flags: ["--disable-gpu"], tolerance: 1e-4 },
  webgpu: { flags: ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-angle=swiftshader", "--use-webgpu-adapter=swiftshader"], tolerance: 1e-3 },
};
const PYTHON = process.env.PYTHON || (existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");

let server, url;
const browsers = [];

async function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => { const { port } = probe.address(); probe.close(() => resolve(port)); });
  });
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: \`make test\` installs Debian's chromium (apt-get install chromium)`);
  const port = await freePort();
  server = spawn(PYTHON, [path.join(REPO, "samples/web/serve.py"), "--port", String(port)], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise((resolve) => server.stdout.once("data", resolve));  // it prints its address once listening
  const out = "/" + path.relative(REPO, path.join(FIXTURES, "minilm"));
  url = `http://127.0.0.1:${port}/samples/web/?out=${out}&adapters=intent,sentiment`;
});

after(async () => {
  for (const browser of browsers) await browser.close();
  server?.kill();
});

for (const [name, { ep = name, query = "", flags, tolerance }] of Object.entries(EPS)) test(`${name}: the page switches task without reloading and shows the Python runtime's answers`, async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: [...FLAGS, ...flags] });
  browsers.push(browser);
  const expected = JSON.parse(await readFile(path.join(FIXTURES, "expected.json"), "utf8")).minilm.classify;
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${url}&ep=${ep}${query}`);
  await page.waitForFunction(() => document.getElementById("status").textContent !== "loading...", null, { timeout: 120000 });
  assert.equal(await page.textContent("#status"), "ready", errors.join("; "));
  const fixtures = JSON.parse(await readFile(path.join(FIXTURES, "expected.json"), "utf8")).minilm;
  const inputs = Object.keys(fixtures.tokens);
  const timings = [];
  for (const [i, text] of inputs.entries()) {
    for (const task of i % 2 ? ["sentiment", "intent"] : ["intent", "sentiment"]) {  // switch task every call
      await page.selectOption("#task", task);
      await page.fill("#text", text);
      const calls = await page.$eval("#result", (r) => Number(r.dataset.calls || 0));
      await page.click("#run");
      await page.waitForFunction((n) => Number(document.getElementById("result").dataset.calls || 0) > n, calls);
      timings.push(await page.$eval("#result", (r) => Number(r.dataset.ms)));
      const shown = await page.$eval("#result", (r) => ({ label: r.dataset.label, score: Number(r.dataset.score) }));
      const want = expected[task][i];
      assert.equal(shown.label, want.label, `${task}: ${text}`);
      assert.ok(Math.abs(shown.score - want.score) <= tolerance, `${ep} ${task}: ${text}: ${shown.score} vs ${want.score}`);
    }
  }
  const loaded = await page.evaluate(() => ({ loadMs: window.edgepeft.loadMs, ep: window.edgepeft.ep, proxy: window.edgepeft.proxy,
    reloads: performance.getEntriesByType("navigation").length }));
  assert.equal(loaded.ep, ep);
  assert.equal(loaded.proxy, query.includes("proxy=1"));
  assert.equal(loaded.reloads, 1);  // one navigation: the tasks switched in place
  assert.deepEqual(errors, []);
  if (ep === "webgpu") {  // the base model leaves the classifiers' slots empty: WebGPU binds no empty tensor (a web
    // hunt: a raw TypeError, then every later call on the Runtime hung); refused now, and the Runtime goes on
    const after = await page.evaluate(async (ids) => {
      const refused = await window.edgepeft.rt.forward([ids]).then(() => "ran", (e) => `${e.name}: ${e.message}`);
      return [refused, Array.from((await window.edgepeft.rt.forward([ids], null, { adapter: "intent" })).logits.dims)];
    }, fixtures.tokens[inputs[0]]);
    assert.match(after[0], /^EdgePeftError: .*model.web.onnx: WebGPU cannot run this call, which leaves \d+ of the base's slots empty/);
    assert.deepEqual(after[1], [1, Object.keys(expected.intent[0].scores).length]);
  }
  await page.screenshot({ path: path.join(FIXTURES, `page-${name}.png`) });
  timings.sort((a, b) => a - b);
  await writeFile(path.join(FIXTURES, `page-${name}.json`), JSON.stringify({ loadMs: loaded.loadMs, medianCallMs: timings[timings.length >> 1] }));
});

test("webgpu asked for where the browser has no adapter: the page says so and names &ep=wasm", async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: [...FLAGS, "--disable-gpu"] });
  browsers.push(browser);
  const page = await browser.newPage();
  await page.goto(`${url}&ep=webgpu`);
  await page.waitForFunction(() => document.getElementById("status").textContent !== "loading...", null, { timeout: 120000 });
  assert.equal(await page.textContent("#status"),
    "error: this browser offers no WebGPU adapter (navigator.gpu); open the page with &ep=wasm");
});
