// Calls awaited at once on one Runtime (Promise.all, a button clicked twice) give what each gives alone, on
// onnxruntime-node and onnxruntime-web: web's wasm runs of one session share its stack, and two that overlapped hung
// the process (its main thread in a wasm wait: no timer fires, so the calls run in a child process with a limit).
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";

import { EdgePeftError } from "../src/runtime.js";
import { openFolder } from "../src/node.js";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.resolve(HERE, "../../../build/js");

const OVERLAPPING = (ortModule, out) => `
import * as ort from ${JSON.stringify(ortModule)};
import { openFolder } from ${JSON.stringify(path.resolve(HERE, "../src/node.js"))};
if (ort.env.wasm) ort.env.wasm.numThreads = 1;
const rt = await openFolder(ort, ${JSON.stringify(out)});
await rt.loadAdapter("prefix");
const ids = [[5, 6, 7], [20, 21, 22]], mask = [[1, 1, 1], [0, 1, 1]];
const generate = (adapter, maxNewTokens) => () => rt.generate(ids, mask, { adapter, maxNewTokens, eosTokenId: [] });
const forward = (adapter) => async () => Array.from((await rt.forward(ids, mask, { adapter })).logits.data);
const groups = [  // the first pair hung onnxruntime-web in lockstep; the others overlap at other steps
  [generate(null, 3), generate("prefix", 3)],
  [generate(null, 3), generate("prefix", 4), generate("prefix", 5), generate(null, 6), forward(null), forward("prefix")],
];
const alone = [], atOnce = [];
for (const group of groups) {
  for (const call of group) alone.push(await call());
  atOnce.push(...await Promise.all(group.map((call) => call())));
}
console.log(JSON.stringify({ alone, atOnce }));
`;

for (const ortModule of ["onnxruntime-node", "onnxruntime-web"]) {
  test(`${ortModule}: generate and forward calls at once give what each gives alone (a prefix adapter's cache too)`, () => {
    const child = spawnSync(process.execPath, ["--input-type=module", "-e", OVERLAPPING(ortModule, path.join(FIXTURES, "gpt2"))],
      { cwd: path.resolve(HERE, ".."), timeout: 60000, encoding: "utf8" });
    assert.equal(child.signal, null, `the calls did not finish within 60 s (they hung): ${child.stderr}`);
    assert.equal(child.status, 0, child.stderr);
    const { alone, atOnce } = JSON.parse(child.stdout);
    assert.deepEqual(atOnce, alone);
  });
}

test("a second load of a name while the first is loading says to await it (not that it is loaded)", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  const bytes = rt.loader.bytes;
  let release;
  const gate = new Promise((resolve) => { release = resolve; });
  rt.loader.bytes = async (rel) => { await gate; return bytes(rel); };  // the first load waits at its graph's bytes
  const first = rt.loadAdapter("lora");
  await new Promise((resolve) => setTimeout(resolve, 100));
  rt.loader.bytes = bytes;
  await assert.rejects(rt.loadAdapter("lora"), (e) => e instanceof EdgePeftError &&
    /an adapter named lora is being loaded by another call; await that call's loadAdapter/.test(e.message));
  release();
  await first;
  await assert.rejects(rt.loadAdapter("lora"), /an adapter named lora is loaded already; unloadAdapter it first/);
});

test("an adapter a call is using is not unloaded until the call is done, as the Python runtime refuses it", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  await rt.loadAdapter("lora");
  const alone = await rt.generate([[5, 6, 7]], null, { adapter: "lora", maxNewTokens: 4, eosTokenId: [] });
  for (const call of [() => rt.generate([[5, 6, 7]], null, { adapter: "lora", maxNewTokens: 4, eosTokenId: [] }),
    () => rt.forward([[5, 6, 7]], null, { adapter: "lora" })]) {
    const inFlight = call();  // unloaded mid-generate, the call went on with tensors no name held
    assert.throws(() => rt.unloadAdapter("lora"), (e) => e instanceof EdgePeftError &&
      e.message === 'adapter "lora" is in use by 1 call(s); unload it when they finish');
    await inFlight;
  }
  assert.deepEqual(await rt.generate([[5, 6, 7]], null, { adapter: "lora", maxNewTokens: 4, eosTokenId: [] }), alone);
  rt.unloadAdapter("lora");  // the calls done: unloaded
  assert.deepEqual(rt.adapterNames, []);
  await assert.rejects(rt.forward([[5, 6, 7]], null, { adapter: "lora" }), /adapter "lora" is not loaded/);
});

test("onnxruntime-web: two exports opened at once each compute with their own weights", async () => {
  // found by a hunt: wasm mounts a graph's external data by file name in one table shared by every session being
  // created, and clears it when any creation ends: of two exports of one architecture opened at once (Promise.all,
  // the page's first opens), one computed with the other's weights, silently
  const { cp, mkdtemp, rm } = await import("node:fs/promises");
  const os = await import("node:os");
  const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-two-"));
  const [a, b] = [path.join(scratch, "a"), path.join(scratch, "b")];
  try {
    for (const out of [a, b]) await cp(path.join(FIXTURES, "llama"), out, { recursive: true });
    const scale = "import sys, onnx, numpy as np\n" +  // b's float weights x 0.7: the same files, other numbers
      "m = onnx.load(sys.argv[1] + '/model.onnx', load_external_data=False)\n" +
      "data = np.fromfile(sys.argv[1] + '/model.onnx.data', dtype=np.uint8)\n" +
      "for t in m.graph.initializer:\n" +
      "    if t.data_location == onnx.TensorProto.EXTERNAL and t.data_type == onnx.TensorProto.FLOAT:\n" +
      "        e = {x.key: int(x.value) for x in t.external_data if x.key in ('offset', 'length')}\n" +
      "        s = slice(e.get('offset', 0), e.get('offset', 0) + e['length'])\n" +
      "        data[s] = (data[s].view(np.float32) * np.float32(0.7)).view(np.uint8)\n" +
      "data.tofile(sys.argv[1] + '/model.onnx.data')\n";
    const PYTHON = process.env.PYTHON || path.resolve(HERE, "../../../.venv/bin/python");
    assert.equal(spawnSync(PYTHON, ["-c", scale, path.join(b, "base")], { encoding: "utf8" }).status, 0);
    const script = `
import * as ort from "onnxruntime-web";
import { openFolder } from ${JSON.stringify(path.resolve(HERE, "../src/node.js"))};
ort.env.wasm.numThreads = 1;
const logits = async (rt) => Array.from((await rt.forward([[5, 6, 7, 8]])).logits.data);
const atOnce = await Promise.all([openFolder(ort, ${JSON.stringify(a)}), openFolder(ort, ${JSON.stringify(b)})]);
const together = [await logits(atOnce[0]), await logits(atOnce[1])];
const alone = [await logits(await openFolder(ort, ${JSON.stringify(a)})), await logits(await openFolder(ort, ${JSON.stringify(b)}))];
console.log(JSON.stringify({ together, alone }));`;
    const child = spawnSync(process.execPath, ["--input-type=module", "-e", script], { cwd: path.resolve(HERE, ".."), timeout: 60000, encoding: "utf8" });
    assert.equal(child.status, 0, child.stderr);
    const { together, alone } = JSON.parse(child.stdout);
    assert.notDeepEqual(alone[0], alone[1]);
    assert.deepEqual(together, alone);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
});
