// Damaged, hand-edited or hostile exports are refused as the Python runtime refuses them (runtimes/manifest.py,
// slot_checks.py, text.py): an EdgePeftError naming the file and a fix, where a TypeError, a raw ONNX Runtime error,
// a file outside the export (a graph named "../x", an adapter graph's external data read from the app's folder) or
// an answer without its labels came before. Adapter graphs are written at test time (Python's onnx package).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { cp, mkdir, mkdtemp, readFile, rename, rm, symlink, truncate, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";
import * as ortWeb from "onnxruntime-web";

import { adapterSessionOptions, checkTensors } from "../src/checks.js";
import { adapterGraphProblem } from "../src/graph.js";
import { EdgePeftError, classify } from "../src/runtime.js";
import { loadTokenizer, openFolder } from "../src/node.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const PYTHON = process.env.PYTHON || (existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");
const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-artifacts-"));
after(() => rm(scratch, { recursive: true, force: true }));
ortWeb.env.wasm.numThreads = 1;

const refuses = (call, pattern) => assert.rejects(call, (e) => {
  assert.ok(e instanceof EdgePeftError, `${e.constructor.name}: ${e.message}`);
  assert.match(e.message, pattern);
  return true;
});
const quoted = (s) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
const got = (value) => quoted(JSON.stringify(value));  // a value as a message shows it, as a pattern
const REEXPORT_BASE = "copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder";

/** A copy of a fixture export to damage (`linked`: its base folder a link, for a base that stays as it is). */
async function copied(name, fixture = "llama", linked = false) {
  const out = path.join(scratch, name);
  if (!linked) {
    await cp(path.join(FIXTURES, fixture), out, { recursive: true });
    return out;
  }
  await mkdir(out);
  await symlink(path.join(FIXTURES, fixture, "base"), path.join(out, "base"));
  await cp(path.join(FIXTURES, fixture, "adapters"), path.join(out, "adapters"), { recursive: true });
  return out;
}

const readJsonFile = async (file) => JSON.parse(await readFile(file, "utf8"));

/** Calls check(edited) with a JSON file of `out` changed by edit(json), then puts the file back. */
async function withEdit(out, rel, edit, check) {
  const file = path.join(out, rel);
  const original = await readFile(file, "utf8");
  const json = JSON.parse(original);
  edit(json);
  await writeFile(file, JSON.stringify(json));
  try {
    await check();
  } finally {
    await writeFile(file, original);
  }
}

// An adapter graph giving each named tensor (0.01 everywhere); "external": the file its values are read from instead.
const GRAPH = `
import json, sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
nodes, inits, outs = [], [], []
for i, (name, t) in enumerate(json.loads(sys.argv[1]).items()):
    init = numpy_helper.from_array(np.full(t["dims"], float(t.get("value", 0.01)), np.float32), f"value{i}")
    if t.get("external"):
        size = len(init.raw_data)
        init.ClearField("raw_data")
        init.data_location = TensorProto.EXTERNAL
        for key, value in (("location", t["external"]), ("offset", "0"), ("length", str(size))):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    inits.append(init)
    nodes.append(helper.make_node("Identity", [f"value{i}"], [name]))
    outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, t["dims"]))
sparse = [helper.make_sparse_tensor(i64("pads", [1 << 30]), i64("at", [3]), [4])] if sys.argv[1] == "sparse" else []
graph = helper.make_graph(nodes, "adapter", [], outs, initializer=inits, sparse_initializer=sparse)
sys.stdout.buffer.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString())
`;

/** Adapter `name` of `out` rewritten to give `tensors` ({slot: {dims, external?}}), adapter.json to match (checksum, slots). */
async function giving(out, name, tensors) {
  const bytes = execFileSync(PYTHON, ["-c", GRAPH, JSON.stringify(tensors)]);
  await writeFile(path.join(out, "adapters", name, "adapter.onnx"), bytes);
  const file = path.join(out, "adapters", name, "adapter.json");
  const slots = Object.fromEntries(Object.entries(tensors).map(([slot, t]) => [slot, t.dims]));
  await writeFile(file, JSON.stringify({ ...await readJsonFile(file), slots, sha256: createHash("sha256").update(bytes).digest("hex") }));
}

const LAYER = (i) => `model.layers.${i}.self_attn.q_proj+k_proj+v_proj`;
const LORA = Object.fromEntries([0, 1].flatMap((i) =>  // the lora fixture's slots: A and B of both layers
  [[`lora_A.${LAYER(i)}`, { dims: [32, 8] }], [`lora_B.${LAYER(i)}`, { dims: [8, 128] }]]));

test("a manifest lacking a field, with one of the wrong type, or naming a graph outside its folder is refused", async () => {
  const out = await copied("fields");
  const adapter = "adapters/lora/adapter.json";
  const where = (rel) => quoted(path.join(out, rel));
  const adapterRefused = async (edit, pattern) => withEdit(out, adapter, edit, async () => {
    const rt = await openFolder(ortNode, out);
    await refuses(rt.loadAdapter("lora"), new RegExp(`^${where(adapter)}: ${pattern}; re-export it under its folder's name \\(edgepeft export --adapter DIR --out OUT --name NAME`));
  });
  await adapterRefused((j) => { delete j.base_fingerprint; delete j.name; }, "manifest lacks name, base_fingerprint");
  await adapterRefused((j) => { j.base_fingerprint = 7; }, "field base_fingerprint must be a string, got 7");
  const outside = "graph must be a file name in the same folder, got";
  await adapterRefused((j) => { j.graph = "../ia3/adapter.onnx"; }, `field ${outside} ${got("../ia3/adapter.onnx")}`);
  await adapterRefused((j) => { j.graph = ".."; }, `field ${outside} ${got("..")}`);
  await adapterRefused((j) => { j.labels = ["a", 2]; }, `field labels must be a list of names, got \\["a",2\\]`);
  await adapterRefused((j) => { j.methods = "lora"; }, `field methods must be a list of method names, got "lora"`);
  await adapterRefused((j) => { j.slots = []; }, "field slots must map slot names to shapes");
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("../lora"), /an adapter's name must be a non-empty string, a folder's name in OUT\/adapters \(no path\)/);

  const baseRefused = async (edit, pattern) => withEdit(out, "base/edgepeft.json", edit, () =>
    refuses(openFolder(ortNode, out), new RegExp(`^${where("base/edgepeft.json")}: ${pattern}; ${quoted(REEXPORT_BASE)}$`)));
  await baseRefused((j) => { j.web_graph = "../base/model.web.onnx"; }, `field web_${outside} ${got("../base/model.web.onnx")}`);
  await baseRefused((j) => { j.neutral_graph = "sub\\neutral.onnx"; }, `field neutral_${outside} ${got("sub\\neutral.onnx")}`);
  await baseRefused((j) => { delete j.outputs; delete j.vocab_size; }, "manifest lacks outputs, vocab_size");
  await baseRefused((j) => { j.vocab_size = "400"; }, `field vocab_size must be a whole number, got "400"`);
  await baseRefused((j) => { j.fingerprint = null; }, "field fingerprint must be a string, got null");
  await baseRefused((j) => { j.outputs = {}; }, "field outputs names no output");
  await baseRefused((j) => { j.slots = {}; }, "field slots must be a list of slots");
  await baseRefused((j) => { j.cache = null; }, "a causal-lm base needs its cache table \\(cache\\)");
  await baseRefused((j) => { delete j.cache.head_dim; }, "field cache lacks the cache layout \\(names with one %d\\)");
  await baseRefused((j) => { j.cache.past_key = 0; }, "field cache lacks the cache layout \\(names with one %d\\)");
  await baseRefused((j) => { j.cache.past_key = "past.key"; }, "field cache lacks the cache layout \\(names with one %d\\)");
  await baseRefused((j) => { j.file_bytes["model.onnx"] = "1"; }, "field file_bytes must be an object of file sizes in bytes, got .*");
  // a jsparity hunt: fields Python refuses at open, read on by Node
  await baseRefused((j) => { j.text_files = "tokenizer.json"; }, `field text_files must be a list of file names in the same folder, got "tokenizer.json"`);
  await baseRefused((j) => { j.text_files = ["../tokenizer.json"]; }, `field text_files must be a list of file names in the same folder, got .*`);
  await baseRefused((j) => { j.file_sha256 = null; }, "field file_sha256 must be an object of SHA-256 digests, got null");
  // values out of range (runtimes/base_checks.py): a cache of 10**12 layers filled the memory, an eos of 5 a TypeError
  await baseRefused((j) => { j.cache.num_layers = 1e12; }, "field cache: num_layers is 1000000000000, field inputs lists 4 past tensors \\(2 a layer\\)");
  await baseRefused((j) => { j.cache.head_dim = -1; }, "field cache: head_dim must be at least 1, got -1");
  await baseRefused((j) => { j.eos_token_id = 5; }, "field eos_token_id must be a list of token ids, got 5");
  await baseRefused((j) => { j.eos_token_id = [1e30]; }, "field eos_token_id must list token ids \\(64-bit integers\\), got \\[1e\\+30\\]");
  await withEdit(out, "base/edgepeft.json", (j) => { j.eos_token_id = [50256]; }, () => openFolder(ortNode, out));  // a config's, never met
  await baseRefused((j) => { j.max_positions = 0; }, "field max_positions must be at least 1 \\(or null\\), got 0");
  await baseRefused((j) => { j.max_positions = null; }, "field max_positions must be the length of a contrib decoder's position tables, got null");
  await baseRefused((j) => { j.ops = "fast"; }, `field ops must be contrib or standard, got "fast"`);
  // what the graph has otherwise (runtimes/base_checks.js): ONNX Runtime's errors at the first call, or the wrong output
  await baseRefused((j) => { j.outputs = Object.fromEntries(Object.entries(j.outputs).reverse()); }, "field outputs must list logits first, a causal-lm graph's");
  await baseRefused((j) => { j.vocab_size = 1000; }, "field vocab_size is 1000, the graph's logits have 400");
  await baseRefused((j) => { j.cache.head_dim = 8; }, "field cache: head_dim is 8, the graph's is 16");
  await baseRefused((j) => { j.inputs.token_type_ids = j.inputs.input_ids; j.type_vocab_size = 2; }, "field inputs lists token_type_ids, which the graph lacks");
  await baseRefused((j) => { j.generation = { max_new_tokens: 0 }; }, "field generation: maxNewTokens must be a positive integer, got 0 \\(the model's default\\)");
  await baseRefused((j) => { j.generation = { eos_token_id: null }; }, "field generation: eos_token_id must be token ids, got null \\(the model's default\\)");
  await baseRefused((j) => { j.generation = { pad_token_id: 400 }; }, "field generation: pad_token_id must be a token id in \\[0, 400\\), got 400 \\(the model's default\\)");
  // found by a hunt: Python refuses these at open; a null read as unset here, stop strings unchecked
  await baseRefused((j) => { j.generation = { top_k: null }; }, "field generation.top_k must be a value \\(or left out\\), got null");
  await baseRefused((j) => { j.generation = { stop: ["###", ""] }; }, `field generation.stop must be a string or a list of non-empty strings, got \\["###",""\\]`);
  await withEdit(out, "base/edgepeft.json", (j) => { j.generation = { stop: "###", max_new_tokens: null, min_p: null }; }, () => openFolder(ortNode, out));
  await withEdit(out, "base/edgepeft.json", (j) => { delete j.ops; }, () => openFolder(ortNode, out));  // older exports
  // a base problem: another export of an adapter into that OUT was refused (its base is older), a fresh one works
  for (const [field, file] of [["neutral_graph", "neutral.onnx"], ["web_graph", "model.web.onnx"]]) {
    await withEdit(out, "base/edgepeft.json", (j) => { delete j[field]; }, () => refuses(openFolder(ortNode, out),
      new RegExp(`^${where("base")}: this export has no ${file.replace(".", "\\.")}; copy the export's base folder again, or re-run \`edgepeft export\` into a fresh --out folder$`)));
  }
  const neutral = path.join(out, "base/neutral.onnx");  // a graph that takes inputs: ONNX Runtime's error, raw
  const kept = await readFile(neutral);
  await cp(path.join(out, "base/model.web.onnx"), neutral);  // another file: its size tells it (as Python's)
  await refuses(openFolder(ortNode, out), /base\/neutral\.onnx: \d+ bytes where the export wrote \d+ \(a copy cut short\?\)/);
  const size = (await readFile(neutral)).length;  // at the size recorded: run, ONNX Runtime's error
  await withEdit(out, "base/edgepeft.json", (j) => { j.file_bytes["neutral.onnx"] = size; }, () => refuses(openFolder(ortNode, out),
    /base\/neutral.onnx: ONNX Runtime cannot load it \(.*\); the file is damaged or incomplete/));
  await writeFile(neutral, kept);
  await (await openFolder(ortNode, out)).loadAdapter("lora");  // put back: it opens and loads
});

test("a BERT prefix written before its text's positions followed the prefix is refused, as Python refuses it", async () => {
  // its states were 3.2 off HF PEFT's, silently: the graph puts the text at positions 0.. (no position_axis)
  const out = await copied("older-prefix", "bert_prefix");
  const older = new RegExp(`^${quoted(path.join(out, "base/edgepeft.json"))}: was written by an older edgepeft \\(its ` +
    "slot prefix_\\S+ puts the text at the prefix's positions, where HF PEFT puts it after them\\); export every " +
    "adapter into a fresh --out folder$");
  await withEdit(out, "base/edgepeft.json", (j) => { j.slots.forEach((s) => { delete s.position_axis; }); }, () =>
    refuses(openFolder(ortNode, out), older));
  await openFolder(ortNode, out);  // as exported: it opens
});

test("a slot table the runtime would misread (axes, targets, selectors, names) is refused, naming the slot", async () => {
  const out = await copied("slot-table");
  const where = quoted(path.join(out, "base/edgepeft.json"));
  const slotRefused = async (name, change, wrong) => withEdit(out, "base/edgepeft.json",
    (j) => change(j.slots.find((s) => s.name === name), j), () => refuses(openFolder(ortNode, out),
      new RegExp(`^${where}: malformed slot ${quoted(name)} \\(${wrong}\\); ${quoted(REEXPORT_BASE)}$`)));
  const prompt = "prompt_embeddings.model.embed_tokens";
  const prefix = "prefix_key.model.layers.0.self_attn";
  const loraA = `lora_A.${LAYER(0)}`;
  await slotRefused(prompt, (s) => { s.virtual_axis = 2; }, "virtual_axis must be an axis of its shape \\(0 to 1\\)");
  await slotRefused(prompt, (s) => { s.virtual_axis = "0"; }, "virtual_axis must be an axis of its shape \\(0 to 1\\)");
  await slotRefused(prefix, (s) => { s.position_axis = -1; }, "position_axis must be an axis of its shape \\(0 to 3\\)");
  await slotRefused(loraA, (s) => { s.stack_axis = 1.5; }, "stack_axis must be an axis of its shape \\(0 to 1\\)");
  await slotRefused(loraA, (s) => { s.shape = [s.shape[0], -1]; }, "its shape's sizes must be 0 or more");
  await slotRefused(prompt, (s) => { s.shape = [1e12, s.shape[1]]; }, "virtual_axis must be a named axis \\(an adapter's count of virtual tokens\\)");
  await slotRefused(prefix, (s) => { s.target = "past_key_values.2.key"; }, "target must name a cache input \\(past_key_values\\.\\*\\)");
  await slotRefused(prefix, (s) => { s.target = "present.0.key"; }, "target must name a cache input \\(past_key_values\\.\\*\\)");
  // fields in range but out of step: a LoRA slot read as virtual tokens, or bound at prefill only, crashed in a call
  await slotRefused(loraA, (s) => { s.virtual_axis = 1; s.phase = "every"; },
    "virtual tokens \\(virtual_axis, target\\) are bound at prefill only \\(phase prefill\\)");
  await slotRefused(loraA, (s) => { s.selector = ""; }, "stack_axis and selector come together \\(a slot that stacks is selected per row\\)");
  await slotRefused("ia3_in.model.layers.0.mlp.down_proj", (s) => { s.neutral = "base"; }, "a slot whose selector " +
    "selects adapters is neutral ones or zeros \\(a row without the adapter reads that value in a mixed batch\\)");  // as Python
  await slotRefused(prefix, (s) => { delete s.virtual_axis; }, "a slot bound at prefill adds virtual tokens and counts them \\(virtual_axis\\)");
  await slotRefused(prompt, (s) => { delete s.virtual_axis; }, "a slot bound at prefill adds virtual tokens and counts them \\(virtual_axis\\)");
  await withEdit(out, "base/edgepeft.json", (j) => { Object.assign(j.slots.find((s) => s.name === loraA), { phase: "prefill", virtual_axis: 1 }); },
    () => refuses(openFolder(ortNode, out), new RegExp(`^${where}: malformed slot ${quoted(`lora_B.${LAYER(0)}`)} \\(phase every ` +
      `differs from ${quoted(loraA)}'s, which shares its axis ${quoted(`lora_r.${LAYER(0)}`)}\\); ${quoted(REEXPORT_BASE)}$`)));
  await slotRefused(loraA, (s) => { s.selector = "lora_A.model.layers.1.self_attn.q_proj+k_proj+v_proj"; },
    "selector must name a selector slot \\(one with selects\\) or be output");
  await slotRefused("lora_rows.batch", (s) => { s.selects = "rows"; }, "selects must be columns or adapters");
  await slotRefused(prompt, (s) => { s.phase = "decode"; }, "phase must be one of every, prefill");
  await slotRefused(prompt, (s) => { s.neutral = "nothing"; }, "neutral must be one of empty, base, ones, zeros");
  await slotRefused(loraA, (s) => { s.members = [1]; }, "members must be module names");
  await slotRefused(loraA, (s) => { s.target = 0; }, "names are strings, .*");  // read as unset before
  await slotRefused(loraA, (s, j) => { j.slots.push({ ...s }); }, "its name is listed twice");
  await slotRefused(loraA, (s) => { s.dtype = "float64"; },
    "names are strings, dtype one of float32, float16, int64, int32, bool, shape sizes or axis names");
  await slotRefused(loraA, (s) => { s.shape = [32, null]; }, "names are strings, dtype one of .*, shape sizes or axis names");
  await slotRefused(loraA, (s) => { s.module = ["x"]; }, "names are strings, .*");
  await withEdit(out, "base/edgepeft.json", (j) => { j.slots[0] = "lora"; },
    () => refuses(openFolder(ortNode, out), new RegExp(`^${where}: malformed slot at 0 \\(not an object\\)`)));
  await openFolder(ortNode, out);  // put back: it opens
});

test("an adapter filling a selector slot, half a LoRA pair or several IA3 adapters is refused, as in Python", async () => {
  const out = await copied("tensors");
  const where = quoted(path.join(out, "adapters"));
  const fix = "re-export it under its folder's name \\(edgepeft export --adapter DIR --out OUT --name NAME --overwrite\\)$";
  // lora_rows.batch is the runtime's per-call choice of rows: an adapter's zeros there silently ran the base model
  await giving(out, "lora", { ...LORA, "lora_rows.batch": { dims: [1, 1, 8] } });
  let rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("lora"),
    new RegExp(`^${where}/lora: fills the selector slot lora_rows\\.batch, which the runtime binds per call; ${fix}`));
  // LoRA A without its B: ONNX Runtime's MatMul failed at the first call
  await giving(out, "lora", { [`lora_A.${LAYER(0)}`]: { dims: [32, 8] } });
  await refuses(rt.loadAdapter("lora"), new RegExp(`^${where}/lora: fills ${quoted(`lora_A.${LAYER(0)}`)} but not ` +
    `${quoted(`lora_B.${LAYER(0)}`)}, which shares its axis ${quoted(`lora_r.${LAYER(0)}`)}; ${fix}`));
  // IA3 stacks one entry per adapter of a batch: an adapter giving 2 failed in ONNX Runtime
  const ia3 = ["ia3_in.model.layers.0.mlp.down_proj", "ia3_in.model.layers.1.mlp.down_proj"].map((n) => [n, { dims: [2, 64] }]);
  const ia3Out = [0, 1].map((i) => [`ia3_out.${LAYER(i)}`, { dims: [2, 128] }]);
  await giving(out, "ia3", Object.fromEntries([...ia3, ...ia3Out]));
  await refuses(rt.loadAdapter("ia3"), new RegExp(`^${where}/ia3: slot ia3_in\\.model\\.layers\\.0\\.mlp\\.down_proj stacks 2 adapters ` +
    `along ia3_n\\.stack; an adapter gives 1; ${fix}`));
  // what an IA3 adapter may leave out (another layer: the stacking axis is not shared) and whole LoRA pairs load
  await giving(out, "ia3", { "ia3_in.model.layers.0.mlp.down_proj": { dims: [1, 64] } });
  await giving(out, "lora", LORA);
  rt = await openFolder(ortNode, out);
  await rt.loadAdapter("ia3");
  await rt.loadAdapter("lora");
});

test("an adapter whose tensors are not finite, or a head of no outputs, is refused at load, as in Python", async () => {
  // found by a hunt: a NaN adapter loaded, and classify answered its first label with a NaN score
  const out = await copied("not-finite");
  await giving(out, "lora", { ...LORA, [`lora_A.${LAYER(0)}`]: { dims: [32, 8], value: "nan" } });
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("lora"), new RegExp(`^${quoted(path.join(out, "adapters"))}/lora: slot ` +
    `${quoted(`lora_A.${LAYER(0)}`)} holds values that are not finite \\(NaN or infinity\\), which no export writes; re-export it`));
  await giving(out, "lora", LORA);  // a folder's graph past what an adapter of the base can take: refused by its size
  await truncate(path.join(out, "adapters", "lora", "adapter.onnx"), rt.most + 1);  // sparse: no disk taken
  await refuses(rt.loadAdapter("lora"), new RegExp(`^${quoted(path.join(out, "adapters", "lora", "adapter.onnx"))}: more than ` +
    `an adapter of this base can take \\(${rt.most} bytes\\); re-export it`));
  await truncate(path.join(out, "adapters", "lora", "adapter.json"), 16 * 2 ** 20 + 1);  // a review: read whole in Node
  await refuses(rt.loadAdapter("lora"), new RegExp(`^${quoted(path.join(out, "adapters", "lora", "adapter.json"))}: not ` +
    "readable JSON \\(16777217 bytes, more than any edgepeft reads \\(16777216\\)\\)"));
  const head = { shape: [4, "head_out.classifier"], dtype: "float32", module: "classifier" };
  const tensors = { "head_weight.classifier": { type: "float32", dims: [4, 0], data: new Float32Array(0) } };
  assert.throws(() => checkTensors(tensors, { slots: { "head_weight.classifier": [4, 0] } }, { "head_weight.classifier": head },
    { "head_out.classifier": ["head_weight.classifier"] }, "a"), /^EdgePeftError: a: slot head_weight\.classifier is a head of no outputs; re-export it/);
});

test("a tokenizer.json past 16 MiB (a large vocabulary's) is read whole, as Python's tokenizers reads it", async () => {
  const out = await copied("large-vocabulary");
  const ids = (await loadTokenizer(out)).encode("w10 w20 w30").ids;
  await writeFile(path.join(out, "base", "tokenizer.json"), " ".repeat(17 * 2 ** 20), { flag: "a" });
  assert.deepEqual((await loadTokenizer(out)).encode("w10 w20 w30").ids, ids);
});

test("a base an export replaces while openFolder reads it is read again whole, as in Python", async () => {
  // a concurrency hunt: openFolder read the old manifest (labels, merged adapter) and ran the new graph, or a graph
  // with weights from both, while an export (--merge --overwrite) renamed a new base in
  const [out, other] = [await copied("replaced-while-opened", "bert_merged"), await copied("replacing", "bert_merged")];
  const width = (await (await openFolder(ortNode, other)).forward([[1, 2, 3]])).logits.dims[1];
  const labels = Array.from({ length: width }, (_, i) => `other${i}`);
  const manifest = JSON.parse(await readFile(path.join(other, "base/edgepeft.json"), "utf8"));
  await writeFile(path.join(other, "base/edgepeft.json"), JSON.stringify({ ...manifest, labels }));
  let swapped = false;
  const ort = { ...ortNode, InferenceSession: { create: async (...args) => {  // the manifest read: the new base renamed in
    if (!swapped) {
      swapped = true;
      await rename(path.join(out, "base"), path.join(scratch, "replaced-base"));
      await rename(path.join(other, "base"), path.join(out, "base"));
    }
    return ortNode.InferenceSession.create(...args);
  } } };
  const rt = await openFolder(ort, out);
  assert.ok(swapped);
  assert.deepEqual(rt.labels(null), labels);
  let renamed = 0;  // replaced at every try, the graph's load failing: as Python's unchanged_while says (the third
  // try's error, ONNX Runtime's "cannot load", was rethrown)
  const always = { ...ortNode, InferenceSession: { create: async () => {
    await rename(path.join(out, "base"), path.join(scratch, `replaced-base-${renamed++}`));
    await cp(path.join(FIXTURES, "bert_merged", "base"), path.join(out, "base"), { recursive: true });
    throw new Error("cannot load the graph: it moved");
  } } };
  await refuses(openFolder(always, out), new RegExp(`^${quoted(path.join(out, "base"))}: replaced 3 times while it was read`));
});

test("an adapter an export replaces while loadAdapter reads it is read again whole, as in Python", async () => {
  // a second concurrency hunt: an --overwrite renaming a new folder in between adapter.json and adapter.onnx being
  // read: "checksum does not match adapter.json (truncated, modified or a stale copy); re-export it" (4 of 1,240 loads)
  const out = await copied("adapter-replaced-while-loaded");
  const rt = await openFolder(ortNode, out);
  const real = rt.loader.bytes;
  let swapped = false;
  rt.loader.bytes = async (rel, most) => {  // adapter.json read: another adapter renamed in under its name now
    if (!swapped && rel.startsWith("adapters/lora/")) {
      swapped = true;
      await rename(path.join(out, "adapters", "lora"), path.join(scratch, "replaced-lora"));
      await cp(path.join(out, "adapters", "ia3"), path.join(out, "adapters", "lora"), { recursive: true });
    }
    return real(rel, most);
  };
  assert.equal(await rt.loadAdapter("lora"), "lora");
  assert.ok(swapped);
  await rt.loadAdapter("ia3");
  const logits = async (adapter) => Array.from((await rt.forward([[1, 2, 3]], null, { adapter })).logits.data);
  assert.deepEqual(await logits("lora"), await logits("ia3"));  // the adapter renamed in, whole
});

test("an adapter graph ONNX Runtime cannot run, or whose outputs Object's own names hide, is refused, as in Python", async () => {
  const out = await copied("odd-graphs");
  const where = quoted(path.join(out, "adapters/lora"));
  const fix = "; re-export it under its folder's name \\(edgepeft export --adapter DIR --out OUT --name NAME --overwrite\\)$";
  const rt = await openFolder(ortNode, out);
  // "constructor" and "__proto__" read as slots of any object: a wrong message, or the output silently gone
  for (const odd of ["constructor", "__proto__"]) {
    await giving(out, "lora", { ...LORA, [odd]: { dims: [1] } });
    await refuses(rt.loadAdapter("lora"), new RegExp(`^${where}: fills slot ${odd}, which this base lacks`));
  }
  await giving(out, "lora", LORA);
  await withEdit(out, "adapters/lora/adapter.json", (j) => {  // a slot dropped from the list, "constructor" instead
    delete j.slots[`lora_A.${LAYER(0)}`];
    j.slots.constructor = [1];
  }, () => refuses(rt.loadAdapter("lora"), new RegExp(`^${where}: adapter.json and adapter.onnx disagree on the slots${fix}`)));
  // an adapter graph whose run fails (out of memory, say): ONNX Runtime's raw error, named as Python names it
  let failing = false;
  const ort = { ...ortNode, InferenceSession: { create: async (...args) => {
    const session = await ortNode.InferenceSession.create(...args);
    if (!failing) return session;
    return { outputNames: session.outputNames, release: () => session.release(), run: async () => { throw new Error("Failed to allocate memory"); } };
  } } };
  const other = await openFolder(ort, out);
  failing = true;
  await refuses(other.loadAdapter("lora"), new RegExp(`^${where}/adapter.onnx: ONNX Runtime cannot run the adapter graph ` +
    `\\(Failed to allocate memory\\)${fix}`));
  failing = false;
  await rt.loadAdapter("ia3");  // the others still load
});

test("an adapter graph holding what no export writes is refused before it runs, as in Python", async () => {
  // a 1 KB graph took 3 GB (ConstantOfShape) or never returned (a Loop of 10^12 steps) in loadAdapter
  const out = await copied("forged-nodes");
  const where = quoted(path.join(out, "adapters/lora/adapter.onnx"));
  const rt = await openFolder(ortNode, out);
  const TOO_MUCH = "its nodes would make \\d+ bytes of tensors, more than an adapter of this base can take \\(\\d+\\)";
  const slots = (await readJsonFile(path.join(out, "base/edgepeft.json"))).slots.length;
  const MANY = `it holds \\d+ outputs, \\d+ nodes and \\d+ tensors, where an export writes an output per slot of its base ` +
    `\\(${slots} here\\) and at most 16 nodes and tensors a slot`;
  const cases = {
    "constant-of-shape": "it holds a ConstantOfShape node \\(exports write Identity, Concat, Pad only\\)",
    loop: "its attribute holds field 6, which exports never write", "concat-many": TOO_MUCH, "wide-pad": TOO_MUCH, "pad-4d": TOO_MUCH,
    sparse: "its graph holds field 15, which exports never write",  // ONNX Runtime took the sparse widths of its name
    // ONNX Runtime takes time quadratic in the nodes (100,000 Identity nodes, 5 MB: minutes)
    "many-nodes": MANY, "many-tensors": MANY,
  };
  for (const [name, said] of Object.entries(cases)) {
    const bytes = execFileSync(PYTHON, ["-c", FORGED, name, String(slots)]);
    await writeFile(path.join(out, "adapters/lora/adapter.onnx"), bytes);
    const json = path.join(out, "adapters/lora/adapter.json");
    await writeFile(json, JSON.stringify({ ...await readJsonFile(json), sha256: createHash("sha256").update(bytes).digest("hex") }));
    await refuses(rt.loadAdapter("lora"), new RegExp(`^${where}: .*${said}.*; re-export it`));
  }
  // an Identity of 100,000 inputs passes the reader; ONNX Runtime's error named every input (megabytes)
  const bytes = execFileSync(PYTHON, ["-c", FORGED, "many-inputs", String(slots)], { maxBuffer: 1 << 30 });
  await writeFile(path.join(out, "adapters/lora/adapter.onnx"), bytes);
  const json = path.join(out, "adapters/lora/adapter.json");
  await writeFile(json, JSON.stringify({ ...await readJsonFile(json), sha256: createHash("sha256").update(bytes).digest("hex") }));
  await assert.rejects(rt.loadAdapter("lora"), (e) => e instanceof EdgePeftError && e.message.length < where.length + 500 &&
    /ONNX Runtime cannot (run|load) /.test(e.message));
  await rt.loadAdapter("ia3");  // the others still load
});

test("an adapter graph is read as ONNX Runtime reads it: a field given twice counts the last time, as in Python", () => {
  // a Concat whose axis was written 0 then 1 was read as 0: doublings then a Pad counted at 260 KB made 1 GB;
  // string tensors were counted 4 bytes an element (a 1 MB string concatenated 600 times passed)
  const varint = (n) => { const out = []; do { out.push((n & 0x7f) | (n > 0x7f ? 0x80 : 0)); n = Math.floor(n / 128); } while (n); return out; };
  const pb = (field, value) => Buffer.from(typeof value === "number" ? [...varint(field * 8), ...varint(value)]
    : [...varint(field * 8 + 2), ...varint(value.length), ...value]);
  const str = (t) => Buffer.from(t);
  const tensor = (name, dims, kind, raw) => Buffer.concat([...dims.map((d) => pb(1, d)), pb(2, kind), pb(8, str(name)), pb(9, raw)]);
  const node = (op, inputs, output, ...attributes) => Buffer.concat([...inputs.map((i) => pb(1, str(i))), pb(2, str(output)),
    pb(4, str(op)), ...attributes.map((a) => pb(5, a))]);
  const axisTwice = Buffer.concat([pb(1, str("axis")), pb(3, 0), pb(3, 1), pb(20, 2)]);
  const nodes = Array.from({ length: 14 }, (_, k) => node("Concat", [k ? `c${k - 1}` : "a", k ? `c${k - 1}` : "a"], `c${k}`, axisTwice));
  nodes.push(node("Pad", ["c13", "pads"], "out"));
  const pads = Buffer.alloc(32);
  pads.writeBigInt64LE(16383n, 0);
  const inits = [tensor("a", [1, 1], 1, Buffer.from(new Float32Array([1]).buffer)), tensor("pads", [4], 7, pads)];
  const model = (graph) => Buffer.concat([pb(1, 9), pb(7, graph)]);
  assert.equal(adapterGraphProblem(model(Buffer.concat([...nodes.map((n) => pb(1, n)), ...inits.map((t) => pb(5, t))])), 70000000),
    "its nodes would make 1073872924 bytes of tensors, more than an adapter of this base can take (70000000)");
  // i written as bytes, which protobuf skips; a 5-byte key whose bits past 32 protobuf drops (a hidden node)
  nodes[0] = node("Concat", ["a", "a"], "c0", Buffer.concat([pb(1, str("axis")), pb(3, 1), pb(3, Buffer.from([0])), pb(20, 2)]));
  assert.equal(adapterGraphProblem(model(Buffer.concat([...nodes.map((n) => pb(1, n)), ...inits.map((t) => pb(5, t))])), 70000000),
    "it is not a graph an export writes (axis written as bytes)");
  const hidden = Buffer.concat([Buffer.from([0x8a, 0x80, 0x80, 0x80, 0x10]), pb(1, node("ConstantOfShape", ["pads"], "big")).subarray(1)]);
  assert.equal(adapterGraphProblem(model(Buffer.concat([hidden, ...inits.map((t) => pb(5, t))])), 70000000),
    "it is not a graph an export writes (a field key out of protobuf's range)");
  const strings = Buffer.concat([tensor("s", [1], 8, Buffer.alloc(0)), pb(6, Buffer.alloc(1000, 120))]);
  const concat = node("Concat", Array(600).fill("s"), "out", Buffer.concat([pb(1, str("axis")), pb(3, 0), pb(20, 2)]));
  assert.equal(adapterGraphProblem(model(Buffer.concat([pb(1, concat), pb(5, strings)])), 70000000),
    "it is not a graph an export writes (its tensor holds field 6, which exports never write)");  // string_data
});

// An adapter graph with one node no export writes (argv[1] names which), beside an output the lora fixture fills.
const FORGED = `
import sys
import numpy as np
from onnx import TensorProto, helper, numpy_helper
i64 = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)
x = numpy_helper.from_array(np.ones((1, 1), np.float32), "x")
nodes, inits = {
    "constant-of-shape": ([helper.make_node("ConstantOfShape", ["shape"], ["big"])], [i64("shape", [1 << 40])]),
    "loop": ([helper.make_node("Loop", ["n", ""], ["big"], body=helper.make_graph([], "b", [], []))], [i64("n", 10 ** 12)]),
    "concat-many": ([helper.make_node("Concat", ["y"] * 1000, ["big"], axis=0)],
                    [numpy_helper.from_array(np.ones(100_000, np.float32), "y")]),
    "wide-pad": ([helper.make_node("Pad", ["x", "pads"], ["big"])], [x, i64("pads", [0, 0, 0, 1 << 30])]),
    "pad-4d": ([helper.make_node("Pad", ["x4", "pads"], ["big"])],
               [numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "x4"), i64("pads", [128] * 8)]),
    "sparse": ([helper.make_node("Pad", ["x", "pads"], ["big"])], [x, i64("pads", [0, 0, 0, 1])]),
    "many-nodes": ([helper.make_node("Identity", ["x" if i == 0 else f"x{i}"], [f"x{i + 1}"]) for i in range(16 * int(sys.argv[2]))]
                   + [helper.make_node("Identity", [f"x{16 * int(sys.argv[2])}"], ["big"])], [x]),
    "many-inputs": ([helper.make_node("Identity", ["x"] * 100_000, ["big"])], [x]),
    "many-tensors": ([helper.make_node("Identity", ["x"], ["big"])],
                     [x] + [numpy_helper.from_array(np.ones(0, np.float32), f"e{i}") for i in range(16 * int(sys.argv[2]))]),
}[sys.argv[1]]
a = "lora_A.model.layers.0.self_attn.q_proj+k_proj+v_proj"
nodes.append(helper.make_node("Identity", ["a"], [a]))
inits.append(numpy_helper.from_array(np.zeros((32, 8), np.float32), "a"))
outs = [helper.make_tensor_value_info(a, TensorProto.FLOAT, [32, 8]), helper.make_tensor_value_info("big", TensorProto.FLOAT, None)]
sparse = [helper.make_sparse_tensor(i64("pads", [1 << 30]), i64("at", [3]), [4])] if sys.argv[1] == "sparse" else []
graph = helper.make_graph(nodes, "adapter", [], outs, initializer=inits, sparse_initializer=sparse)
sys.stdout.buffer.write(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString())
`;

test("an adapter graph reading external data (a file of the app's working folder) is refused, on node and wasm", async () => {
  const out = await copied("external");
  const folder = path.join(scratch, "app");  // the app's working folder, holding a file the adapter must not read
  await mkdir(folder);
  await writeFile(path.join(folder, "secret.bin"), new Uint8Array(new Float32Array(32 * 8).fill(7).buffer));
  await giving(out, "lora", { ...LORA, [`lora_A.${LAYER(0)}`]: { dims: [32, 8], external: "secret.bin" } });
  const cwd = process.cwd();
  process.chdir(folder);
  try {
    for (const ort of [ortNode, ortWeb]) {
      const rt = await openFolder(ort, out);
      await refuses(rt.loadAdapter("lora"), new RegExp(`^${quoted(path.join(out, "adapters/lora/adapter.onnx"))}: .*it reads ` +
        "tensors from another file \\(external data\\), where adapter graphs hold them inside\\); re-export it under its folder's name \\(edgepeft export"));
      assert.deepEqual(rt.adapterNames, []);
      await rt.loadAdapter("ia3");  // the others still load
    }
  } finally {
    process.chdir(cwd);
  }
  // the caller's own session options are kept; only where external data is read from is set
  assert.deepEqual(adapterSessionOptions({ logSeverityLevel: 3, extra: { session: { a: "1" }, b: { c: "2" } } }), {
    logSeverityLevel: 3,
    extra: { session: { a: "1", model_external_initializers_file_folder_path: "/edgepeft: adapter graphs hold their tensors inside" },
      b: { c: "2" } },
  });
});

test("label names that do not fit the head are refused at classify, naming the manifest, as in Python", async () => {
  const out = await copied("labels", "minilm", true);
  await withEdit(out, "adapters/intent/adapter.json", (j) => { j.labels = j.labels.slice(0, 2); }, async () => {
    const rt = await openFolder(ortNode, out);
    await rt.loadAdapter("intent");
    const { logits } = await rt.forward([[101, 2054, 102]], null, { adapter: "intent" });
    assert.throws(() => classify(logits, rt.labels("intent"), 0, rt.problemType), (e) => e instanceof EdgePeftError &&
      e.message === `${path.join(out, "adapters/intent/adapter.json")}: gives 2 label name(s), the head has 6 outputs; ` +
      "re-export with --overwrite");
  });
  const merged = await copied("labels-merged", "bert_merged");  // a --merge export: the base's manifest gives them
  const width = (await (await openFolder(ortNode, merged)).forward([[1, 2, 3]])).logits.dims[1];
  await withEdit(merged, "base/edgepeft.json", (j) => { j.labels = Array.from({ length: width + 1 }, (_, i) => `l${i}`); }, async () => {
    const rt = await openFolder(ortNode, merged);
    const { logits } = await rt.forward([[1, 2, 3]]);
    assert.throws(() => classify(logits, rt.labels(null)), (e) => e instanceof EdgePeftError && e.message ===
      `${path.join(merged, "base/edgepeft.json")}: gives ${width + 1} label name(s), the head has ${width} outputs; re-export with --overwrite`);
  });
  assert.throws(() => classify(new ortNode.Tensor("float32", Float32Array.from([1, 2, 3]), [1, 3]), ["a", "b"]), (e) =>
    e instanceof EdgePeftError &&
    e.message === "the labels given: gives 2 label name(s), the head has 3 outputs; give one name per output");
});

test("a weights file linked out of the base folder is named with a fix that works, as in Python", async () => {
  const out = await copied("weights-linked");  // ONNX Runtime 1.24+ reads no weights there: "damaged", copy it again
  const data = path.join(out, "base", "model.onnx.data"), store = path.join(scratch, "weights-store");
  const logits = async () => Array.from((await (await openFolder(ortNode, out)).forward([[1, 2, 3]])).logits.data);
  const want = await logits();
  await mkdir(store);
  await rename(data, path.join(store, "model.onnx.data"));
  await symlink(path.join(store, "model.onnx.data"), data);
  let said = "";
  await assert.rejects(openFolder(ortNode, out), (e) => e instanceof EdgePeftError && (said = e.message).startsWith(
    `${data}: is a link to ${path.join(store, "model.onnx.data")}, outside the graph's folder`));
  execFileSync("sh", ["-c", said.split("; put the file in its place: ")[1]]);  // as written
  assert.deepEqual(await logits(), want);
});

test("a quoted '~' and a model folder of a type edgepeft does not export are named as such, as in Python", async () => {
  await refuses(openFolder(ortNode, "~/no-such-export"), new RegExp(`^~/no-such-export: '~' is not expanded here; give ` +
    `it the full path, ${quoted(path.join(os.homedir(), "no-such-export"))}$`));
  const model = path.join(scratch, "qwen3-model");
  await mkdir(model);
  await writeFile(path.join(model, "config.json"), JSON.stringify({ model_type: "qwen3" }));
  const adapter = path.join(scratch, "qwen3-adapter");
  await mkdir(adapter);
  await writeFile(path.join(adapter, "adapter_config.json"), JSON.stringify({ base_model_name_or_path: model }));
  for (const folder of [model, adapter]) {  // "export it first", which export refuses
    await refuses(openFolder(ortNode, folder), new RegExp(`^${quoted(folder)}: is not an export, and ` +
      `${quoted(path.join(model, "config.json"))}'s model type 'qwen3' is one edgepeft does not export`));
  }
});
