// What the JavaScript runtime refuses rather than answer wrongly, as the Python runtime refuses it: options a call
// does not know (dropped in silence, they ran the base model), an adapter.onnx that is not the one adapter.json
// names, missing or damaged files of an export (raw ONNX Runtime or JSON errors before), JavaScript's other forms
// of token ids, and SHA-256 without Web Crypto.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { spawnSync } from "node:child_process";
import { copyFile, cp, mkdir, mkdtemp, readFile, rename, rm, symlink, truncate, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";
import * as ortWeb from "onnxruntime-web";

import { adapterName } from "../src/fixes.js";
import { EdgePeftError } from "../src/runtime.js";
import { loadTokenizer, openFolder } from "../src/node.js";
import { sha256Plain } from "../src/sha256.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const PYTHON = process.env.PYTHON || path.join(REPO, ".venv/bin/python");
const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-"));
after(() => rm(scratch, { recursive: true, force: true }));
ortWeb.env.wasm.numThreads = 1;

const refuses = (call, pattern) => assert.rejects(call, (e) => e instanceof EdgePeftError && pattern.test(e.message));

/** A JSON file of an export with some fields changed. */
async function editJson(file, change) {
  await writeFile(file, JSON.stringify({ ...JSON.parse(await readFile(file, "utf8")), ...change }));
}

/** A copy of the llama fixture to damage. */
async function copied(name) {
  const out = path.join(scratch, name);
  await cp(path.join(FIXTURES, "llama"), out, { recursive: true });
  return out;
}

test("options a call does not know are refused, not dropped (they ran the base model)", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  await rt.loadAdapter("lora");
  const ids = [[5, 6, 7]];
  await refuses(rt.forward(ids, null, "lora"), /forward's options must be an object such as \{ adapter: \.\.\. \}; got "lora"/);
  await refuses(rt.forward(ids, null, { adaptor: "lora" }), /forward has no option adaptor; its options are adapter, tokenTypeIds$/);
  await refuses(rt.generate(ids, null, { adapter: "lora", max_new_tokens: 3 }),
    /generate has no option max_new_tokens; .*\(maxNewTokens: camelCase here\); stop strings and mixed batches/);
  await refuses(rt.generate(ids, null, { maxNewToken: 3 }), /generate has no option maxNewToken/);
  await refuses(openFolder(ortNode, path.join(FIXTURES, "llama"), { executionProviders: ["cpu"] }),
    /Runtime.open has no option executionProviders; its options are sessionOptions \(.*go inside sessionOptions\)/);
  // Python's mixed and weighted batches: a message that fits, not "adapter lora is not loaded"
  await refuses(rt.forward(ids, null, { adapter: ["lora"] }), /adapter must be one loaded adapter's name or null.*Python runtime's only/);
  await refuses(rt.forward(ids, null, { adapter: { lora: 0.5 } }), /adapter must be one loaded adapter's name/);
  await refuses(rt.loadAdapter(7), /an adapter's name must be a non-empty string/);
  // what is known still runs: the options object may be left out or empty
  assert.deepEqual(Array.from((await rt.forward(ids)).logits.data), Array.from((await rt.forward(ids, null, {})).logits.data));
});

test("JavaScript's other forms of token ids are taken (bigint, typed arrays); strings are refused as such", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  const want = Array.from((await rt.forward([[5, 6, 7]], [[1, 1, 1]])).logits.data);
  for (const [ids, mask] of [[[[5n, 6n, 7n]], [[1n, 1n, 1n]]], [[Int32Array.from([5, 6, 7])], [Int32Array.from([1, 1, 1])]],
    [[BigInt64Array.from([5n, 6n, 7n])], null], [Int32Array.from([5, 6, 7]), Uint8Array.from([1, 1, 1])]]) {
    assert.deepEqual(Array.from((await rt.forward(ids, mask)).logits.data), want);
  }
  await refuses(rt.forward([["5", "6"]]), /ids must hold whole numbers; got "5"/);
  await refuses(rt.forward([[5, 6]], [["1", "1"]]), /mask must hold whole numbers; got "1"/);
  await refuses(rt.forward([[5n, 2n ** 70n]]), /ids must hold whole numbers; got 1180591620717411303424n/);
  assert.deepEqual(await rt.generate([Int32Array.from([5, 6, 7])], null, { maxNewTokens: 2, eosTokenId: [] }),
    await rt.generate([[5, 6, 7]], null, { maxNewTokens: 2, eosTokenId: [] }));
});

test("an adapter.onnx that is not the one adapter.json names is refused (checksum), as in Python", async () => {
  const out = await copied("swapped");
  await copyFile(path.join(out, "adapters/ia3/adapter.onnx"), path.join(out, "adapters/lora/adapter.onnx"));
  for (const ort of [ortNode, ortWeb]) {
    const rt = await openFolder(ort, out);
    await refuses(rt.loadAdapter("lora"), /adapters\/lora\/adapter.onnx: checksum does not match adapter.json.*re-export it/);
    assert.deepEqual(rt.adapterNames, []);
    await rt.loadAdapter("ia3");  // the others still load
  }
});

test("an adapter whose tensors do not fit the base's slots is refused, as in Python", async () => {
  const out = await copied("slots");
  const rt = await openFolder(ortNode, out);
  const slot = rt.manifest.slots.find((s) => s.name.startsWith("lora_A."));
  rt.slots = { ...rt.slots, [slot.name]: { ...slot, shape: [slot.shape[0] + 1, slot.shape[1]] } };
  await refuses(rt.loadAdapter("lora"), new RegExp(`slot ${slot.name.replace(/[.+]/g, "\\$&")} is float32\\[.*\\], the base expects`));
  rt.slots = { ...rt.slots, [slot.name]: { ...slot, dtype: "float16" } };
  await refuses(rt.loadAdapter("lora"), /the base expects float16/);
  const manifest = JSON.parse(await readFile(path.join(out, "adapters/lora/adapter.json"), "utf8"));
  delete manifest.slots[slot.name];
  await writeFile(path.join(out, "adapters/lora/adapter.json"), JSON.stringify(manifest));
  rt.slots = Object.fromEntries(rt.manifest.slots.map((s) => [s.name, s]));
  await refuses(rt.loadAdapter("lora"), /adapter.json and adapter.onnx disagree on the slots/);
});

test("missing or damaged files of an export name the file and a fix, on node and on wasm", async () => {
  for (const [label, ort] of [["node", ortNode], ["wasm", ortWeb]]) {
    const out = await copied(`damaged-${label}`);
    const rt = await openFolder(ort, out);
    await rm(path.join(out, "adapters/lora/adapter.onnx"));
    await refuses(rt.loadAdapter("lora"), /adapters\/lora\/adapter.onnx: missing from the export; re-export it under its folder's name \(edgepeft export --adapter DIR --out OUT --name NAME/);
    await writeFile(path.join(out, "adapters/ia3/adapter.json"), "{\"name\": ");
    await refuses(rt.loadAdapter("ia3"), /adapters\/ia3\/adapter.json: not readable JSON \(.*\); re-export it/);
    const data = path.join(out, "base/model.onnx.data");
    const whole = await readFile(data);
    await truncate(data, whole.length - 64);  // a copy to a device cut short: named with its sizes, as in Python
    await refuses(openFolder(ort, out), new RegExp(`base/model.onnx.data: ${whole.length - 64} bytes where the export wrote ` +
      `${whole.length} \\(a copy cut short\\?\\); copy the export's base folder again`));
    await writeFile(data, whole);
    await truncate(path.join(out, "base/model.web.onnx"), 100);
    await refuses(openFolder(ort, out), /base\/model.web.onnx: 100 bytes where the export wrote \d+ \(a copy cut short\?\)/);
    const manifest = JSON.parse(await readFile(path.join(out, "base/edgepeft.json"), "utf8"));
    delete manifest.file_bytes;  // an export from before sizes were recorded: ONNX Runtime's own failure, named
    await writeFile(path.join(out, "base/edgepeft.json"), JSON.stringify(manifest));
    await refuses(openFolder(ort, out), /base\/model.web.onnx: ONNX Runtime cannot load it \(.*\); the file is damaged or incomplete: copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder$/);
    await writeFile(path.join(out, "base/edgepeft.json"), "{");
    await refuses(openFolder(ort, out), /base\/edgepeft.json: not readable JSON/);
  }
  const out = await copied("no-data");
  await rm(path.join(out, "base/model.onnx.data"));
  for (const ort of [ortNode, ortWeb]) {  // the graph was blamed for it ("damaged: re-export it")
    await refuses(openFolder(ort, out), /base\/model.onnx.data: missing; copy the export's base folder again, or re-run `edgepeft export`/);
  }
  await rm(path.join(out, "base/tokenizer.json"));
  await refuses(loadTokenizer(out), /base\/tokenizer.json: missing \(the export has no tokenizer, or the file was removed\); copy the export's base folder again, or pass token ids, or export from a base folder that has tokenizer.json into a fresh --out folder$/);
  await writeFile(path.join(out, "base/tokenizer_config.json"), "{");
  await refuses(loadTokenizer(out), /base\/tokenizer_config.json: not readable JSON/);
  for (const text of ["null", "[]", "5"]) {  // a TypeError, or loaded as if there were no config
    await writeFile(path.join(out, "base/tokenizer_config.json"), text);
    await refuses(loadTokenizer(out), /base\/tokenizer_config.json: not a tokenizer file the tokenizers library can read; copy the export's base folder again, or re-run/);
  }
  const tokenized = await copied("split-special");  // the Python runtime and transformers encode "</s>" as text
  const config = path.join(tokenized, "base/tokenizer_config.json");
  await editJson(config, { split_special_tokens: true });
  await refuses(loadTokenizer(tokenized), /tokenizer_config.json: split_special_tokens .* is not in the JavaScript tokenizer; pass token ids/);
});

test("SHA-256 without Web Crypto (a page served over plain http) gives Web Crypto's digests", () => {
  for (const n of [0, 1, 55, 56, 63, 64, 65, 1000, 65537]) {
    const bytes = new Uint8Array(randomBytes(n));
    assert.equal(sha256Plain(bytes), createHash("sha256").update(bytes).digest("hex"), `${n} bytes`);
  }
});

test("an export in a newer format than this runtime reads is named, as the Python runtime names it", async () => {
  const out = await copied("newer");
  const edit = (rel, change) => editJson(path.join(out, rel), change);
  await edit("adapters/lora/adapter.json", { format_version: 99 });
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("lora"), /adapters\/lora\/adapter.json: format version 99 is newer than this runtime reads \(4\); update the JavaScript runtime/);
  await rt.loadAdapter("ia3");  // the others still load
  await edit("base/edgepeft.json", { format_version: 99 });
  await refuses(openFolder(ortNode, out), /base\/edgepeft.json: format version 99 is newer than this runtime reads/);
  for (const odd of [-5, "3"]) {  // -5 was taken, "3" called newer
    await edit("base/edgepeft.json", { format_version: odd });
    await refuses(openFolder(ortNode, out), new RegExp(`base/edgepeft.json: format version ${JSON.stringify(odd)} is not a ` +
      "version \\(a whole number from 1\\); copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder$"));
  }
  await edit("base/edgepeft.json", { format: "something-else", format_version: 3 });
  await refuses(openFolder(ortNode, out), /base\/edgepeft.json: not an edgepeft-base manifest/);
});

test("a tokenizer this library would encode otherwise than the Python runtime is refused, naming what to do", async () => {
  const out = await copied("tokenizers");
  const file = path.join(out, "base/tokenizer.json");
  const original = JSON.parse(await readFile(file, "utf8"));
  const refusedWith = async (edit, pattern) => {
    const json = structuredClone(original);
    edit(json);
    await writeFile(file, JSON.stringify(json));
    await refuses(loadTokenizer(out), pattern);
  };
  // the library splits every word into characters (it ignores the prefix), or matches the token inside words
  await refusedWith((j) => { j.model.continuing_subword_prefix = "##"; },
    /base\/tokenizer.json: a BPE model with continuing_subword_prefix "##" is not in the JavaScript tokenizer; pass token ids/);
  await refusedWith((j) => {  // its merges join the second part without the prefix, as the Rust library: not damaged
    const size = Object.keys(j.model.vocab).length;
    Object.assign(j.model, { continuing_subword_prefix: "##", vocab: { ...j.model.vocab, "##zq": size, zzq: size + 1 } });
    j.model.merges = [...j.model.merges, ["z", "##zq"]];
  }, /a BPE model with continuing_subword_prefix "##" is not in the JavaScript tokenizer; pass token ids/);
  await refusedWith((j) => { j.added_tokens.push({ ...j.added_tokens[0], id: 999, content: "<w>", single_word: true }); },
    /added token "<w>" with single_word \(matched inside words here\) is not in the JavaScript tokenizer; pass token ids/);
  // SentencePiece's character map (XLM-R-tokenized BERT models): the library ignores it, a zero-width joiner (emoji
  // sequences) and decomposed accents were other ids, silently (a hunt)
  await refusedWith((j) => { j.normalizer = { type: "Sequence", normalizers: [{ type: "Precompiled", precompiled_charsmap: "AAAA" }] }; },
    /base\/tokenizer.json: a Precompiled normalizer \(SentencePiece's character map, .*\) is not in the JavaScript tokenizer; pass token ids/);
  // a part the library does not know: named, not a bare Error
  await refusedWith((j) => { j.pre_tokenizer = { type: "UnicodeScripts" }; },
    /base\/tokenizer.json: the JavaScript tokenizer cannot read it \(.*UnicodeScripts.*\); pass token ids encoded by the Python runtime/);
  // damaged files the Rust library refuses, which this one read as if whole (it guesses BPE, skips a merge): named as
  // the Python runtime names them (a hunt)
  const reexport = "; copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder$";
  await refusedWith((j) => { j.model.type = "Foo"; }, new RegExp("base/tokenizer.json: not a tokenizer the tokenizers " +
    `library can read \\(its model type "Foo"\\)${reexport}`));
  const [a, b] = original.model.merges.find(([x, y]) => x.length === 1 && y.length === 1);
  await refusedWith((j) => { delete j.model.vocab[a + b]; }, new RegExp("base/tokenizer.json: not a tokenizer the " +
    `tokenizers library can read \\(its merge \\["${a}","${b}"\\] of a token its vocabulary lacks \\("${a + b}"\\)\\)${reexport}`));
  await writeFile(file, JSON.stringify(original));
  assert.ok((await loadTokenizer(out)).encode("w10 w20").ids.length);
});

test("a copy without a tokenizer file the export wrote is named, as Python names it (texts were cut elsewhere)", async () => {
  const out = await copied("text-files");
  await editJson(path.join(out, "base/edgepeft.json"), { text_files: ["tokenizer.json", "tokenizer_config.json"] });
  assert.ok((await loadTokenizer(out)).encode("w10 w20").ids.length);
  await rm(path.join(out, "base/tokenizer_config.json"));
  await refuses(loadTokenizer(out), new RegExp(`^${path.join(out, "base/tokenizer_config.json")}: missing; copy the export's base folder again`));
});

test("a token added to the tokenizer and not to the model's embeddings is named in tokenizer.json, as Python names it", async () => {
  // forward said "outside the vocabulary; tokenize with the base model's tokenizer", which the app had done
  const out = await copied("added-token");
  const file = path.join(out, "base/tokenizer.json");
  const json = JSON.parse(await readFile(file, "utf8"));
  const { vocab_size: vocab } = JSON.parse(await readFile(path.join(out, "base/edgepeft.json"), "utf8"));
  json.added_tokens.push({ ...json.added_tokens[0], id: vocab, content: "<new>", special: false });
  await writeFile(file, JSON.stringify(json));
  const python = spawnSync(PYTHON, ["-c", `import sys
from edgepeft.runtimes.text import TextTokenizer
try:
    TextTokenizer(sys.argv[1], vocab_size=${vocab}).encode(["w10 <new>"])
except Exception as e:
    print(e)`, path.join(out, "base")], { encoding: "utf8", env: { ...process.env, HF_HUB_OFFLINE: "1" } });
  const said = python.stdout.trim().replace("'<new>'", '"<new>"');  // Python's repr, JSON's quotes
  assert.match(said, new RegExp(`^${file.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}: gives "<new>" the id ${vocab}, past the model's`));
  const tokenizer = await loadTokenizer(out);
  assert.throws(() => tokenizer.encode("w10 <new>"), (e) => e instanceof EdgePeftError && e.message === said);
  assert.throws(() => tokenizer.encode("w10", { text_pair: "<new>" }), (e) => e instanceof EdgePeftError && e.message === said);
  assert.ok(tokenizer.encode("w10 w20").ids.length);  // a text without it encodes
  await rm(path.join(out, "base/edgepeft.json"));  // no manifest: no vocabulary size to check against
  assert.ok((await loadTokenizer(out)).encode("w10 <new>").ids.includes(vocab));
});

test("a batch no memory holds is an OutOfMemoryError naming it and the fix, and the runtime runs on", () => {
  // ONNX Runtime's allocation failure was a plain Error, logged in red as well; run under a capped address space
  const script = `
import * as ort from "onnxruntime-node";
import { OutOfMemoryError } from ${JSON.stringify(path.join(REPO, "runtimes/js/src/runtime.js"))};
import { openFolder } from ${JSON.stringify(path.join(REPO, "runtimes/js/src/node.js"))};
const rt = await openFolder(ort, ${JSON.stringify(path.join(FIXTURES, "llama"))});
const row = Array.from({ length: 60 }, (_, i) => 5 + (i % 50));
const error = await rt.forward(Array.from({ length: 40000 }, () => row)).catch((e) => e);
const after = (await rt.forward([row])).logits.dims;
console.log(JSON.stringify({ memory: error instanceof OutOfMemoryError, message: String(error?.message), after }));`;
  const child = spawnSync("sh", ["-c", 'ulimit -v 3000000 && exec "$0" --input-type=module -e "$1"', process.execPath, script],
    { cwd: path.join(REPO, "runtimes/js"), encoding: "utf8", timeout: 120000 });
  assert.equal(child.status, 0, child.stderr);
  const { memory, message, after } = JSON.parse(child.stdout);
  assert.ok(memory, message);
  assert.match(message, /base\/model\.web\.onnx: a batch of 40000 row\(s\) x 60 positions does not fit in memory here \(.*(Failed to allocate memory|bad_alloc).*\); use a smaller batch or shorter inputs$/);
  assert.deepEqual(after.slice(0, 2), [1, 60]);
  assert.doesNotMatch(child.stderr, /Failed to allocate|Non-zero status code/);  // said once, by the error
});

test("bigints in a call's arguments are named in the refusal (a TypeError from JSON.stringify), and any int64 eos is taken", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  const ids = [[5, 6, 7]];
  await refuses(rt.forward(ids, null, { adapter: 1n }), /adapter must be one loaded adapter's name or null \(the base model\), got 1n/);
  await refuses(rt.loadAdapter(1n), /an adapter's name must be a non-empty string.*, got 1n$/);
  await refuses(rt.generate(ids, null, { eosTokenId: [2n ** 70n], maxNewTokens: 2 }),
    /eosTokenId must be a token id or a list of token ids \(integers\), got \[1180591620717411303424n\]$/);
  const tokenizer = await loadTokenizer(path.join(FIXTURES, "llama"));
  assert.throws(() => tokenizer.encode([1n]), (e) => e instanceof EdgePeftError && /got \[1n\]$/.test(e.message));
  await refuses(rt.forward([[5, 2n ** 60n]]), /^token id 11529215046068\d+ is outside the vocabulary \[0, \d+\) of /);
  // as Python: an int64 past any vocabulary is an eos that never comes
  assert.deepEqual(await rt.generate(ids, null, { eosTokenId: [2n ** 60n], maxNewTokens: 4 }),
    await rt.generate(ids, null, { eosTokenId: [], maxNewTokens: 4 }));
});

test("labels() is a copy: an app sorting it does not rename the classes of later calls", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "minilm"));
  await rt.loadAdapter("intent");
  const labels = rt.labels("intent");
  rt.labels("intent").sort().reverse();
  assert.deepEqual(rt.labels("intent"), labels);
  assert.notEqual(rt.labels("intent"), rt.labels("intent"));
});

test("a file inside OUT where the export has a folder is named, not OUT (OUT was right)", async () => {
  const out = await copied("file-for-folder");
  await writeFile(path.join(out, "adapters", "stray"), "x");
  await refuses(openFolder(ortNode, out).then((r) => r.loadAdapter("stray")),
    new RegExp(`^${path.join(out, "adapters", "stray").replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")}: a file where the export has ` +
      "a folder; remove it and export again$"));
  await refuses(openFolder(ortNode, path.join(out, "base", "edgepeft.json")), /edgepeft.json: is a file of the export .*; give .* itself$/);
});

test("a link in OUT/adapters to nothing (a disk not mounted) or to itself is named as a link, as Python names one", async () => {
  // found by a hunt: "not an exported adapter (no adapter.json) ... re-export ... --name ghost --overwrite", an export
  // that failed after its work (its folder cannot replace the link); a loop was "cannot read it (ELOOP)"
  const out = path.join(scratch, "links"), ghost = path.join(out, "adapters", "ghost"), loop = path.join(out, "adapters", "loop");
  await mkdir(path.join(out, "adapters"), { recursive: true });
  await symlink(path.join(FIXTURES, "llama", "base"), path.join(out, "base"));
  await symlink(path.join(scratch, "not-mounted", "ghost"), ghost);
  await symlink("loop", loop);
  const rt = await openFolder(ortNode, out);
  const python = spawnSync(PYTHON, ["-c", "import sys; from edgepeft.files import check_output_dir\ntry: " +
    "check_output_dir(sys.argv[1], '--out')\nexcept Exception as e: print(e)", ghost], { encoding: "utf8" }).stdout;
  const said = `${ghost}: is a link to ${path.join(scratch, "not-mounted", "ghost")}, which does not exist; create or mount it`;
  assert.ok(python.startsWith(`${said}, or give --out another folder`), python);  // Python's words for it, to --out
  await assert.rejects(rt.loadAdapter("ghost"), (e) => e instanceof EdgePeftError && e.message === `${said}, or remove the link`);
  await assert.rejects(rt.loadAdapter("loop"), (e) => e instanceof EdgePeftError && e.message ===
    `${loop}: is a link to loop, which leads back to itself (a loop of links); remove the link, or make it lead to a folder`);
});

test("folders a stopped or unfinished export left are named with a fix that works, as in Python", async () => {
  // found by a hunt: each said "no adapter lora in this export; export it there first" or "re-export it into this
  // OUT", and that export was refused (the folder is there: --overwrite), or the base looked not exported at all
  const done = spawnSync("true");  // a process of this machine that no longer runs, as a killed export's
  const host = spawnSync(PYTHON, ["-c", "from edgepeft.runtimes.access import this_host; print(this_host())"])
    .stdout.toString().trim();  // Python's hash of this machine: the JavaScript runtime tells it alike
  const stopped = `p${done.pid}h${host}-x1`;
  const out = await copied("stopped with space");  // a path the commands given quote
  await cp(path.join(out, "adapters/lora"), path.join(out, `adapters/.old-lora-${stopped}`), { recursive: true });
  await cp(path.join(out, "adapters/lora"), path.join(out, `adapters/.old-bottleneck-p${done.pid}h0123abcd-x1`),
    { recursive: true });  // another machine's (a shared drive): no export of this one was stopped there
  await rm(path.join(out, "adapters/lora"), { recursive: true });
  await rm(path.join(out, "adapters/bottleneck"), { recursive: true });
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("lora"), new RegExp(`adapters/lora: moved aside to .*adapters/\\.old-lora-${stopped} by an ` +
    "export into .* that was stopped; run that export again \\(it puts the folder back first\\)$"));
  await refuses(rt.loadAdapter("bottleneck"), /no adapter bottleneck in this export; export it there first/);
  await rm(path.join(out, "adapters/ia3/adapter.json"));  // a folder without its manifest
  await refuses(rt.loadAdapter("ia3"), /adapters\/ia3: not an exported adapter \(no adapter.json\); remove it if it is a stray folder, or re-export its adapter into this OUT: `edgepeft export --adapter DIR --out '.*stopped with space' --name ia3 --overwrite`$/);
  await cp(path.join(out, "adapters/prefix"), path.join(out, "adapters/my.prefix"), { recursive: true });
  await editJson(path.join(out, "adapters/my.prefix/adapter.json"), { base_fingerprint: "a".repeat(64) });
  await refuses(rt.loadAdapter("my.prefix"), /made for another base .*; remove .*adapters\/my.prefix, then re-export its adapter into this OUT: `edgepeft export --adapter DIR --out '.*' --name my_prefix`; or, where this OUT is a copy, copy the export it came from again: its base folder and every adapter$/);
  await editJson(path.join(out, "adapters/prompt/adapter.json"), { base_fingerprint: "a".repeat(64) });
  await refuses(rt.loadAdapter("prompt"), /adapters\/prompt: made for another base .*; remove .*adapters\/prompt, or re-export its adapter into this OUT: `edgepeft export --adapter DIR --out '.*' --name prompt --overwrite`; or, where this OUT is a copy, copy the export it came from again: its base folder and every adapter$/);
  await writeFile(path.join(out, "adapters/prompt/.adapter.json.new"), "{}");  // its re-pointed manifest, not renamed in
  await refuses(rt.loadAdapter("prompt"), /an export into .* was stopped before it re-pointed it; run that export again \(where OUT can be locked, .*\), or re-export/);
  // an export still running (its old base aside, this process standing in for it) is committing: the manifest it
  // renames in next is read (a second concurrency hunt: "was stopped ... run that export again", of that export)
  const repointed = JSON.parse(await readFile(path.join(out, "adapters/prompt/adapter.json"), "utf8"));
  await writeFile(path.join(out, "adapters/prompt/.adapter.json.new"), JSON.stringify({ ...repointed, base_fingerprint: rt.manifest.fingerprint }));
  await mkdir(path.join(out, `.old-base-p${process.pid}h${host}-x2`));
  assert.equal(await rt.loadAdapter("prompt"), "prompt");
  await rm(path.join(out, `.old-base-p${process.pid}h${host}-x2`), { recursive: true });
  rt.unloadAdapter("prompt");
  await refuses(rt.loadAdapter("prompt"), /an export into .* was stopped before it re-pointed it/);
  await cp(path.join(out, "base"), path.join(out, `.old-base-${stopped}`), { recursive: true });
  await rm(path.join(out, "base"), { recursive: true });
  await refuses(openFolder(ortNode, out), new RegExp(`stopped with space/base: moved aside to .*\\.old-base-${stopped} by an export into`));
  const merged = path.join(scratch, "merged");
  await cp(path.join(FIXTURES, "bert_merged"), merged, { recursive: true });
  await cp(path.join(FIXTURES, "llama/adapters/lora"), path.join(merged, "adapters/lora"), { recursive: true });
  await refuses((await openFolder(ortNode, merged)).loadAdapter("lora"), /merged\/base holds a --merge export \(.*\), which takes no adapters; remove it from .*merged\/adapters, or export it into another --out$/);
});

test("an adapter of another model is to be removed or served by its export, as in Python", async () => {
  // found by a fixes hunt: "re-export its adapter into this OUT", which export refuses for another model
  const out = await copied("other model");
  await cp(path.join(FIXTURES, "minilm/adapters/intent"), path.join(out, "adapters/from_minilm"), { recursive: true });
  const rt = await openFolder(ortNode, out);
  await refuses(rt.loadAdapter("from_minilm"), /; remove .*adapters\/from_minilm: it was made for a seq-cls export \(of .*\), not this causal-lm one: load it on the export it was made for$/);
  const bert = path.join(scratch, "other task");  // the same model exported for another task (a review)
  await cp(path.join(FIXTURES, "bert_prefix"), bert, { recursive: true });
  await cp(path.join(FIXTURES, "bert_pairs/adapters/lora"), path.join(bert, "adapters/pairs"), { recursive: true });
  await refuses((await openFolder(ortNode, bert)).loadAdapter("pairs"), /; remove .*adapters\/pairs: it was made for a seq-cls export \(of .*\), not this feature-extraction one: load it on the export it was made for$/);
  await editJson(path.join(out, "adapters/lora/adapter.json"), { base_fingerprint: "a".repeat(64), base_source: "/elsewhere/llama" });
  await refuses(rt.loadAdapter("lora"), /; remove .*adapters\/lora, or, where \/elsewhere\/llama is the model of .*, re-export its adapter into this OUT: `edgepeft export --adapter DIR --out '.*other model' --name lora --overwrite`$/);
});

test("a folder that is not an export (its base, an adapter of it, an HF PEFT adapter, a model) is named as Python names it", async () => {
  // found by a hunt: each was "base/edgepeft.json: no such file; export there first", a fix that fails for all four
  const llama = path.join(FIXTURES, "llama"), peftAdapter = path.join(scratch, "peft-adapter"), model = path.join(scratch, "model");
  const dotted = path.join(scratch, "my.topic");  // a name export refuses: the command passes --name my_topic
  const long = path.join(scratch, "意图".repeat(42));  // 252 bytes: its --out <folder>-onnx was past a name's 255
  const device = path.join(scratch, "aux");  // a device's name on Windows: --name aux_adapter
  const saved = path.join(scratch, "saved");  // a hfsaves hunt: HF PEFT's adapters saved under their names
  for (const [folder, file] of [[peftAdapter, "adapter_config.json"], [model, "config.json"], [dotted, "adapter_config.json"],
    [long, "adapter_config.json"], [device, "adapter_config.json"], [path.join(saved, "b.v2"), "adapter_config.json"],
    [path.join(saved, "other"), "adapter_config.json"]]) {
    await mkdir(folder, { recursive: true });
    await writeFile(path.join(folder, file), "{}");  // only the file's name tells what the folder is
  }
  // a review: a base moved aside by another container's export (its tag another host's): named with the mv, as Python
  const aside = await copied("aside elsewhere");
  await rename(path.join(aside, "base"), path.join(aside, ".old-base-p1h0123abcd-x1"));
  const folders = [path.join(llama, "base"), path.join(llama, "adapters"), path.join(llama, "adapters", "lora"), peftAdapter, model,
    dotted, aside, long, device, saved];
  const python = spawnSync(PYTHON, ["-c", "import json, sys; from edgepeft.runtimes.manifest import not_an_export; " +
    "print(json.dumps([str(not_an_export(p)) for p in sys.argv[1:]]))", ...folders], { encoding: "utf8" });
  const escaped = (text) => new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);
  for (const [i, said] of JSON.parse(python.stdout).entries()) {
    await refuses(() => openFolder(ortNode, folders[i]), escaped(said));
    await refuses(() => loadTokenizer(folders[i]), escaped(said));
  }
  const said = await openFolder(ortNode, long).catch((e) => e.message), fresh = /--out '([^']+)'/.exec(said)[1];
  assert.ok(Buffer.byteLength(path.basename(fresh)) <= 255 && fresh.endsWith("-onnx"), said);
});

test("a folder's name is an adapter's in both runtimes or in neither (Python's name_problem, fixes.js adapterName)", () => {
  // a review: Python's strip() and JS's trim() differ (NEL, BOM): "lora\u0085" was Python's refusal, "\ufefflora" JS's
  const names = ["lora", "lora ", " lora", "lo ra", ".lora", "lo.ra", "team/lora", "team\\lora", "lo\u0000ra", "lora\u007f",
    "lora\u0085", "\ufefflora", "lo\ufeffra", "lora\u00a0", "\u2028lora", "lora\u3000", "none", "None", "", "   ", "意图"];
  const python = spawnSync(PYTHON, ["-c", "import json, sys; from edgepeft.runtimes.commands import name_problem; " +
    "print(json.dumps([name_problem(n, folder=True) is None for n in json.load(sys.stdin)]))"],
  { encoding: "utf8", input: JSON.stringify(names) });
  assert.deepEqual(names.map(adapterName), JSON.parse(python.stdout), python.stderr);
});

test("an export an earlier edgepeft wrote, without a record a call reads, is named with the fix (Python's older_export)", async () => {
  // a hunt across versions: generate ignored the model's generation_config.json, a multi-label classifier was
  // scored by softmax, where the manifest had no such record (read as a default), unsaid
  for (const [fixture, field] of [["llama", "generation"], ["bert_pairs", "problem_type"]]) {
    const out = path.join(scratch, `older-${fixture}`);
    await cp(path.join(FIXTURES, fixture), out, { recursive: true });
    const file = path.join(out, "base", "edgepeft.json"), manifest = JSON.parse(await readFile(file, "utf8"));
    delete manifest[field];
    await writeFile(file, JSON.stringify(manifest));
    const rt = await openFolder(ortNode, out), said = new RegExp(`^${path.join(out, "base").replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}: ` +
      `was written by an earlier edgepeft, whose manifest records no ${field} \\(.*\\); export every adapter into a fresh --out folder$`);
    if (field === "generation") await refuses(rt.generate([[5, 6, 7]], null, { maxNewTokens: 2 }), said);
    else assert.throws(() => rt.problemType, (e) => e instanceof EdgePeftError && said.test(e.message));
  }
});

test("a base manifest gone or of another form, an HF PEFT folder in OUT/adapters and generate on a classifier get " +
     "Python's fixes (a jsparity hunt: 'export there first' and 're-run export' were refused in that OUT)", async () => {
  const REEXPORT_BASE = "copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder";
  const gone = await copied("manifest-gone");
  await rm(path.join(gone, "base", "edgepeft.json"));
  await refuses(openFolder(ortNode, gone), new RegExp(`: missing, beside other files .*; ${quote(REEXPORT_BASE)}$`));
  const other = await copied("manifest-other");
  await writeFile(path.join(other, "base", "edgepeft.json"), "[]");
  await refuses(openFolder(ortNode, other), new RegExp(`not an edgepeft-base manifest; ${quote(REEXPORT_BASE)}$`));
  const dropped = await copied("hf-peft-dropped-in");
  await mkdir(path.join(dropped, "adapters", "fresh"));
  await writeFile(path.join(dropped, "adapters", "fresh", "adapter_config.json"), "{}");
  await refuses((await openFolder(ortNode, dropped)).loadAdapter("fresh"),
    /fresh: is an adapter folder in HF PEFT format, not an exported one; move /);
  const classifier = await openFolder(ortNode, path.join(FIXTURES, "bert_pairs"));
  await refuses(classifier.generate([[1, 2, 3]]), /bert_pairs\/base: a seq-cls export has no text generation; export a /);
});
const quote = (s) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");

test("a file of an export given as OUT names the export, and a file linked to itself is told to lead to a file, as " +
     "in Python (a jsparity hunt: a path through the file; 'lead to a folder')", async () => {
  const out = await copied("file-as-out");
  for (const file of [path.join(out, "base", "edgepeft.json"), path.join(out, "adapters", "lora", "adapter.json")]) {
    await refuses(openFolder(ortNode, file), new RegExp(`^${quote(file)}: is a file of the export ${quote(out)}; give ` +
      `${quote(out)} itself$`));
  }
  const data = path.join(out, "base", "model.onnx.data");
  await rm(data);
  await symlink(data, data);
  await refuses(openFolder(ortNode, out), /model\.onnx\.data: is a link to .*, which leads back to itself \(a loop of links\); remove the link, or make it lead to a file$/);
});
