// The values a caller passes, refused as the Python runtime refuses them: shown as given ("3", 3n, [NaN]), named as
// the caller's (not the export's files, not another address), and never coerced into another answer. JavaScript's
// own forms of a value (bigints, objects of another realm) are taken where Python takes numpy's.
import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm, symlink } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import vm from "node:vm";

import * as ortNode from "onnxruntime-node";

import { EdgePeftError, classify } from "../src/runtime.js";
import { loadTokenizer, openFolder } from "../src/node.js";
import { urlLoader } from "../src/web.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const LLAMA = path.join(FIXTURES, "llama");
const refuses = (call, pattern) => assert.rejects(call, (e) => e instanceof EdgePeftError && pattern.test(e.message));
const throwsEdge = (call, pattern) => assert.throws(call, (e) => e instanceof EdgePeftError && pattern.test(e.message));

test("sessionOptions: null is ONNX Runtime's defaults; a value that is not an object is named, not the export's files", async () => {
  const plain = await openFolder(ortNode, LLAMA);
  const nulled = await openFolder(ortNode, LLAMA, { sessionOptions: null });  // a TypeError before
  const ids = [[5, 6, 7]];
  assert.deepEqual(Array.from((await nulled.forward(ids)).logits.data), Array.from((await plain.forward(ids)).logits.data));
  for (const [value, shown] of [[5, "5"], [true, "true"], [[], "\\[\\]"], ["cpu", '"cpu"']]) {  // 5, true: "re-run edgepeft export"
    await refuses(openFolder(ortNode, LLAMA, { sessionOptions: value }),
      new RegExp(`^Runtime.open's sessionOptions must be an object of ONNX Runtime's session options.*got ${shown}$`));
  }
});

test("generate's settings are shown as given, and a bigint whole number is taken as ids are", async () => {
  const rt = await openFolder(ortNode, LLAMA);
  const ids = [[5, 6, 7]];
  await refuses(rt.generate(ids, null, { maxNewTokens: "3" }), /^maxNewTokens must be a positive integer, got "3"$/);  // got 3
  await refuses(rt.generate(ids, null, { maxNewTokens: [3] }), /^maxNewTokens must be a positive integer, got \[3\]$/);
  await refuses(rt.generate(ids, null, { doSample: "false" }), /^doSample must be true or false, got "false"$/);
  await refuses(rt.generate(ids, null, { doSample: true, temperature: "0.5" }), /temperature must be a finite number, got "0.5"$/);
  await refuses(rt.generate(ids, null, { maxNewTokens: 0n }), /^maxNewTokens must be a positive integer, got 0$/);
  await refuses(rt.generate(ids, null, { seed: 2n ** 64n }), /^seed must be an integer in .*got 18446744073709551616n$/);
  const numbers = await rt.generate(ids, null, { maxNewTokens: 3, topK: 5, seed: 1, doSample: true });
  const bigints = await rt.generate(ids, null, { maxNewTokens: 3n, topK: 5n, seed: 1n, doSample: true });  // refused: "got 3"
  assert.deepEqual(bigints, numbers);
  await refuses(rt.generate(ids, null, { doSample: true, repetitionPenalty: 1e-40, maxNewTokens: 2, seed: 1 }),
    /repetitionPenalty 1e-40 too far from 1\); raise the temperature, bring repetitionPenalty nearer to 1, or use greedy decoding$/);
});

test("adapter names: one string, shown quoted; a name with spaces at its ends, a control character, a '.' first or a rename refused", async () => {
  const out = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-names-"));
  await mkdir(path.join(out, "adapters"));
  await symlink(path.join(LLAMA, "base"), path.join(out, "base"));
  await symlink(path.join(LLAMA, "adapters", "lora"), path.join(out, "adapters", "lora"));
  await symlink(path.join(LLAMA, "adapters", "lora"), path.join(out, "adapters", ".lora"));  // hidden: as .staging-lora-...
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter(".lora"), /^an adapter's name must be .*not hidden \(no '\.' first\).*, got "\.lora"$/);  // Python leaves it out
  await rt.loadAdapter("lora");
  throwsEdge(() => rt.unloadAdapter(["lora"]), /^unloadAdapter takes one adapter's name \(a string\), got \["lora"\]$/);
  throwsEdge(() => rt.unloadAdapter("lora "), /^adapter "lora " is not loaded; loaded: "lora" \(use adapter null/);
  await refuses(rt.forward([[5]], null, { adapter: "lora " }), /^adapter "lora " is not loaded; loaded: "lora"/);
  // " lora" was told to export --name lora, which OUT holds; "lora\0" to "check the disk"
  await refuses(rt.loadAdapter(" lora"), /^an adapter's name must be a non-empty string.*no spaces at its ends, got " lora"$/);
  await refuses(rt.loadAdapter("lo\u0000ra"), /^an adapter's name must be.*got "lo\\u0000ra"$/);
  await refuses(rt.loadAdapter("team\\lora"), /^an adapter's name must be.*got "team\\\\lora"$/);  // a path on Windows
  await refuses(rt.loadAdapter("None"), /^an adapter's name must be.*nor none \(the base model at the command line\).*got "None"$/);  // as Python
  await refuses(rt.loadAdapter("prompt", "alias"), /^loadAdapter takes one argument, an adapter's name, got "prompt","alias"; it loads under its folder's name/);  // dropped
  assert.deepEqual(rt.adapterNames, ["lora"]);
  rt.unloadAdapter("lora");
  assert.equal(await rt.loadAdapter("lora", undefined), "lora");  // a wrapper forwarding an optional argument
  rt.unloadAdapter("lora");
  assert.deepEqual(rt.adapterNames, []);
  await rm(out, { recursive: true });
});

test("classify's arguments: labels an array of names, a problemType a name, logits floats", () => {
  const logits = new ortNode.Tensor("float32", Float32Array.from([2, 1, 0.5]), [1, 3]);
  throwsEdge(() => classify(logits, "abc"), /^classify's labels must be an array of names.*got "abc"$/);  // a, b, c
  throwsEdge(() => classify(logits, ["a", "b", "c"], 0, 5), /^classify's problemType must be the model's.*got 5$/);
  throwsEdge(() => classify(new ortNode.Tensor("int64", BigInt64Array.from([2n, 1n]), [1, 2]), null),
    /a float tensor, batch x labels.*got int64 \[1,2\]/);  // a TypeError converting a BigInt
  // a name transformers' pipeline does not know scores as it does: softmax
  const [top] = classify(logits, ["a", "b", "c"], 0, "multi_label");
  assert.equal(top.label, "a");
  assert.ok(Math.abs(top.score - Math.exp(2) / (Math.exp(2) + Math.exp(1) + Math.exp(0.5))) < 1e-6);
});

test("openUrl's and loadTokenizer's address: undefined, null, a number or \"\" is refused, not fetched under the page", async () => {
  const page = Object.getOwnPropertyDescriptor(globalThis, "location");
  globalThis.location = { href: "http://127.0.0.1:9/app/index.html" };
  try {
    for (const [value, shown] of [[undefined, "undefined"], [null, "null"], [5, "5"], ["", '""']]) {
      throwsEdge(() => urlLoader(value), new RegExp(`^openUrl and loadTokenizer take an export's address .*got ${shown}$`));
    }
    assert.equal(urlLoader("/out").where("base/edgepeft.json"), "http://127.0.0.1:9/out/base/edgepeft.json");
  } finally {
    if (page) Object.defineProperty(globalThis, "location", page);
    else delete globalThis.location;
  }
  await assert.rejects(loadTokenizer(`${LLAMA}\u0000`), /openFolder and loadTokenizer take an export's folder/);
});

test("options made in another realm (Node's vm, another frame) are options; decode names NaN as NaN", async () => {
  const rt = await openFolder(ortNode, LLAMA);
  const options = vm.runInNewContext("({ maxNewTokens: 2 })");  // "must be an object ... got Object"
  assert.equal((await rt.generate([[5, 6, 7]], null, options))[0].length, 5);
  await refuses(rt.generate([[5, 6, 7]], null, vm.runInNewContext("new Map()")), /generate's options must be an object/);
  const tokenizer = await loadTokenizer(LLAMA);
  assert.throws(() => tokenizer.decode([NaN]), (e) => e instanceof EdgePeftError && /\[NaN\]/.test(e.message));  // [null]
});
