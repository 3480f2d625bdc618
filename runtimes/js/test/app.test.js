// The JavaScript runtime as an app uses it: a relative OUT opened once whatever the app's directory is later, a
// Runtime released (onnxruntime-web frees a session on release only), sessionOptions blamed where they are at fault
// (not the files), an old onnxruntime named, arguments named rather than TypeErrors, classify's logits checked,
// decode as the Python runtime's.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmod, cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";

import { EdgePeftError, Runtime, classify } from "../src/runtime.js";
import { loadTokenizer, openFolder } from "../src/node.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-app-"));
after(() => rm(scratch, { recursive: true, force: true }));
const refuses = (call, pattern) => assert.rejects(call, (e) => e instanceof EdgePeftError && pattern.test(e.message));

test("a relative OUT is the folder opened, after the app changes directory (another copy there served its adapter)", async () => {
  const home = process.cwd();
  await cp(path.join(FIXTURES, "llama"), path.join(scratch, "a", "out"), { recursive: true });
  await mkdir(path.join(scratch, "b"));
  try {
    process.chdir(path.join(scratch, "a"));
    const rt = await openFolder(ortNode, "out");
    process.chdir(path.join(scratch, "b"));  // holds no out/: the adapter was looked for here
    assert.equal(await rt.loadAdapter("lora"), "lora");
  } finally {
    process.chdir(home);
  }
});

test("OUT given as LINK/../out is the folder the system finds there (path.resolve took the one beside LINK)", async () => {
  await cp(path.join(FIXTURES, "llama"), path.join(scratch, "real", "out"), { recursive: true });
  await mkdir(path.join(scratch, "real", "deep"));
  await symlink(path.join(scratch, "real", "deep"), path.join(scratch, "link"));
  for (const beside of [false, true]) {  // nothing named out beside the link (the usual case), then a folder there
    if (beside) await mkdir(path.join(scratch, "out"));
    const rt = await openFolder(ortNode, `${scratch}/link/../out`);  // path.join drops "link/.." by its text too
    assert.equal(await rt.loadAdapter("lora"), "lora");
  }
});

test("OUT given as LINK/../out where the system finds nothing is refused, naming that folder (the out beside LINK opened)", async () => {
  const home = path.join(scratch, "dotdot"), target = path.join(home, "releases", "v2", "current");
  await cp(path.join(FIXTURES, "llama"), path.join(home, "out"), { recursive: true });  // beside the link: not the path's
  await mkdir(target, { recursive: true });
  await symlink(target, path.join(home, "cur"));  // cur/.. is releases/v2, which holds no out (ls cur/../out fails)
  const missing = path.join(home, "releases", "v2", "out", "base", "edgepeft.json");
  await assert.rejects(openFolder(ortNode, `${home}/cur/../out`), (e) => e.message.startsWith(`${missing}: no such file`));
  // a review: a link to nothing (a disk not mounted) on the way is followed too, as Python's realpath follows it
  await symlink(path.join(home, "mnt", "v3", "current"), path.join(home, "gone"));
  const unmounted = path.join(home, "mnt", "v3", "out", "base", "edgepeft.json");
  await assert.rejects(openFolder(ortNode, `${home}/gone/../out`), (e) => e.message.startsWith(`${unmounted}: no such file`));
});

test("release frees the base session; later calls are refused, not run", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "minilm"));
  const ids = [[101, 2054, 102]];
  const pending = rt.forward(ids);  // queued before the release: it runs
  await rt.release();
  assert.ok((await pending).logits);
  await refuses(rt.forward(ids), /this Runtime was released; open the export again/);
  await refuses(rt.loadAdapter("intent"), /this Runtime was released; open the export again/);  // it loaded
  await rt.release();  // twice: nothing more
  // a generate made before the release takes every decode step (its steps after the prefill were refused)
  const llama = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  const want = await llama.generate([[5, 6, 7]], null, { maxNewTokens: 5, eosTokenId: [] });
  const generating = llama.generate([[5, 6, 7]], null, { maxNewTokens: 5, eosTokenId: [] });
  await llama.release();
  assert.deepEqual(await generating, want);
  await refuses(llama.generate([[5, 6, 7]], null, { maxNewTokens: 1 }), /this Runtime was released/);
});

test("an open that fails after the base session was made releases it (80 MB of wasm kept per failed open)", async () => {
  const out = path.join(scratch, "no-neutral");
  await cp(path.join(FIXTURES, "minilm"), out, { recursive: true });
  const neutral = path.join(out, "base", "neutral.onnx");  // damaged at its size: found once the base session is made
  await writeFile(neutral, Buffer.alloc((await readFile(neutral)).length));
  let made = 0, released = 0;
  const ort = { ...ortNode, InferenceSession: { create: async (...args) => {
    const session = await ortNode.InferenceSession.create(...args);
    made++;
    return { inputNames: session.inputNames, outputNames: session.outputNames, run: (f) => session.run(f),
      release: () => { released++; return session.release(); } };
  } } };
  await refuses(openFolder(ort, out), /neutral\.onnx: ONNX Runtime cannot load it/);
  assert.equal(made, 1);
  assert.equal(released, 1);
});

test("the export's own files: a base re-exported since, a missing weights file, another user's file", async () => {
  const out = path.join(scratch, "files");
  await cp(path.join(FIXTURES, "llama"), out, { recursive: true });
  const rt = await openFolder(ortNode, out);
  const edit = async (rel, change) => writeFile(path.join(out, rel), JSON.stringify(change(JSON.parse(await readFile(path.join(out, rel), "utf8")))));
  await edit("base/edgepeft.json", (m) => ({ ...m, fingerprint: "f".repeat(64) }));  // re-exported since it was opened
  await edit("adapters/lora/adapter.json", (m) => ({ ...m, base_fingerprint: "f".repeat(64) }));
  await refuses(rt.loadAdapter("lora"), /made for the base OUT holds now, re-exported since this Runtime opened it .*; open the export again to serve it$/);
  await rm(path.join(out, "base", "model.onnx.data"));  // ONNX Runtime's error named model.web.onnx, "damaged: re-export it"
  await refuses(openFolder(ortNode, out), /model\.onnx\.data: missing; copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder$/);
  const locked = path.join(scratch, "locked");
  await cp(path.join(FIXTURES, "llama"), locked, { recursive: true });
  await chmod(scratch, 0o755);
  await chmod(path.join(locked, "base", "model.web.onnx"), 0);  // ONNX Runtime said "system error number 13": damaged
  const root = process.geteuid?.() === 0;
  if (root) process.seteuid(65534);  // chmod 0 stops an owner, but not root
  try {
    const uid = root ? 65534 : process.geteuid();  // the effective id: the real one is root's
    await refuses(openFolder(ortNode, locked), new RegExp(`model\\.web\\.onnx: permission denied for this user \\(uid ${uid}\\); make it readable \\(chmod, chown\\)`));
  } finally {
    if (root) process.seteuid(0);
  }
  const closed = path.join(scratch, "closed");
  await cp(path.join(FIXTURES, "llama"), closed, { recursive: true });
  for (const [folder, call] of [["base", null], ["adapters", "lora"]]) {  // a jsparity hunt: the file inside was named
    await chmod(path.join(closed, folder), 0);  // and making it readable did nothing
    if (root) process.seteuid(65534);
    try {
      await refuses(openFolder(ortNode, closed).then((rt) => call && rt.loadAdapter(call)),
        new RegExp(`^${path.join(closed, folder)}: permission denied for this user`));
    } finally {
      if (root) process.seteuid(0);
      await chmod(path.join(closed, folder), 0o755);
    }
  }
  await rm(path.join(locked, "base", "model.web.onnx"), { force: true });
  await mkdir(path.join(locked, "base", "model.web.onnx"));  // a copy gone wrong
  await refuses(openFolder(ortNode, locked), /model\.web\.onnx: a folder where the export has a file; remove it and export again$/);
});

test("a pipe or a device in a file's place is refused as missing, not read for ever", { skip: process.platform === "win32" }, async () => {
  const out = path.join(scratch, "special");  // a download or a user put a link or a special file there
  await cp(path.join(FIXTURES, "llama"), out, { recursive: true });
  const rt = await openFolder(ortNode, out);
  const graph = path.join(out, "adapters", "lora", "adapter.onnx");
  await rm(graph);
  await symlink("/dev/zero", graph);  // read until its end: 4.5 GB in 20 s
  await refuses(rt.loadAdapter("lora"), /adapters\/lora\/adapter\.onnx: missing from the export; re-export it/);
  await rm(path.join(out, "adapters", "ia3", "adapter.json"));
  execFileSync("mkfifo", [path.join(out, "adapters", "ia3", "adapter.json")]);  // read: blocks for ever
  await refuses(rt.loadAdapter("ia3"), /adapters\/ia3: not an exported adapter \(no adapter\.json\)/);
});

test("what is wrong with an app's arguments is named, not blamed on the export", async () => {
  const out = path.join(FIXTURES, "minilm");
  await refuses(openFolder(ortNode, out, { sessionOptions: { graphOptimizationLevel: "bogus" } }),
    /model\.web\.onnx: ONNX Runtime cannot load it with the sessionOptions given \(.*\); it loads without them/);
  await refuses(openFolder(ortNode, undefined), /openFolder and loadTokenizer take an export's folder \(a path\), got undefined/);
  await refuses(loadTokenizer(""), /take an export's folder \(a path\), got ""/);
  await refuses(loadTokenizer(path.join(scratch, "no-such-out")), /edgepeft\.json: no such file; export there first/);
  await refuses(openFolder(undefined, out), /Runtime\.open takes ONNX Runtime's module first/);
  await refuses(openFolder(ortNode, path.join(out, "base", "edgepeft.json")), /edgepeft.json: is a file of the export .*; give .* itself$/);
  const logits = new ortNode.Tensor("float32", new Float32Array(6), [1, 2, 3]);  // a decoder's (batch, sequence, vocab)
  assert.throws(() => classify(logits, null), (e) => e instanceof EdgePeftError && /batch x labels/.test(e.message));
  assert.throws(() => classify(new ortNode.Tensor("float32", new Float32Array(2), [1, 2]), null, 1), /one of their rows/);
  assert.throws(() => classify(undefined, null), /batch x labels.*got undefined/);  // a TypeError reading .dims
  const minilm = await openFolder(ortNode, out);  // float ids: refused, as in Python (a dtype) and in decode
  await refuses(minilm.forward([Float32Array.from([101, 102])]), /ids must be token ids \(integers: numbers, an Int32Array, a BigInt64Array\), got Float32Array/);
  await refuses(minilm.forward([[101, 102]], [Float64Array.from([1, 1])]), /mask must be 0 and 1 \(integers: .*\), got Float64Array/);
  const Float16 = globalThis.Float16Array ?? class Float16Array extends Uint16Array {  // Node 24's: whole values got through
    get [Symbol.toStringTag]() { return "Float16Array"; }  // a real one's tag, where this Node has none
  };
  await refuses(minilm.forward([Float16.from([101, 102])]), /ids must be token ids \(integers: .*\), got Float16Array/);
  class Ids extends Float32Array {}  // a review: refused before Float16Array was, taken by its constructor's name
  await refuses(minilm.forward([Ids.from([101, 102])]), /ids must be token ids \(integers: .*\), got /);
  const llama = await openFolder(ortNode, path.join(FIXTURES, "llama"));  // bigint ids are taken: bigint eos ids too
  const want = await llama.generate([[5, 6, 7]], null, { maxNewTokens: 3, eosTokenId: [2] });
  for (const eos of [2n, [2n], BigInt64Array.from([2n])]) {  // a TypeError from JSON.stringify
    assert.deepEqual(await llama.generate([[5, 6, 7]], null, { maxNewTokens: 3, eosTokenId: eos }), want);
  }
  await refuses(llama.generate([[5, 6, 7]], null, { eosTokenId: [2.5] }), /eosTokenId must be a token id or a list of token ids \(integers\), got \[2\.5\]/);
  await refuses(Runtime.open(ortNode, out), /Runtime\.open takes a loader of the export's files, got ".*"; open a folder with openFolder/);
});

test("an onnxruntime older than the exports need is named, not blamed on the files", async () => {
  const refusing = (node) => ({  // onnxruntime-node 1.21 on a decoder: no GroupQueryAttention with 11 inputs
    ...ortNode, env: { versions: { common: node, node } },
    InferenceSession: { create: async () => { throw new Error("Could not find an implementation for GroupQueryAttention(1)"); } },
  });
  const out = path.join(FIXTURES, "llama");
  await refuses(openFolder(refusing("1.21.1"), out),
    /model\.web\.onnx: ONNX Runtime cannot load it \(.*GroupQueryAttention.*\); edgepeft's exports need onnxruntime-node>=1\.22, this is 1\.21\.1: npm install onnxruntime-node@latest$/);
  await refuses(openFolder(refusing("1.22.0"), out), /model\.web\.onnx: .*the file is damaged or incomplete: copy the export's base folder again, or re-run `edgepeft export`/);
});

test("decode skips special tokens by default, as the Python runtime's", async () => {
  const tokenizer = await loadTokenizer(path.join(FIXTURES, "minilm"));
  const ids = tokenizer.encode("hello world").ids;
  assert.equal(tokenizer.decode(ids), "hello world");
  assert.match(tokenizer.decode(ids, { skip_special_tokens: false }), /^\[CLS\] hello world \[SEP\]$/);
  // what ONNX Runtime hands back, and an empty sequence, as Python decodes them (the library threw a plain Error)
  assert.equal(tokenizer.decode(BigInt64Array.from(ids, BigInt)), "hello world");
  assert.equal(tokenizer.decode(Int32Array.from(ids)), "hello world");
  assert.equal(tokenizer.decode([]), "");
  // -1 was dropped in silence; a float typed array of whole numbers was decoded (Python refuses a float array)
  class Ids extends Float32Array {}  // a review: a subclass's constructor name hid its type
  for (const bad of [[5.5], [-1, 5], "hello", undefined, Float32Array.from(ids), Ids.from(ids)]) {
    assert.throws(() => tokenizer.decode(bad), (e) => e instanceof EdgePeftError &&
      /^decode takes one sequence of token ids \(integers >= 0\), got /.test(e.message));
  }
});

test("decode keeps a byte order mark a byte run spells, and encode refuses half a character, as the Python runtime", async () => {
  // a Llama-2-style byte-fallback tokenizer: the library's TextDecoder dropped U+FEFF at the start of each byte run
  const bytes = Array.from({ length: 256 }, (_, i) => `<0x${i.toString(16).toUpperCase().padStart(2, "0")}>`);
  const vocab = Object.fromEntries(["<unk>", "▁", "a", "b", ...bytes].map((t, i) => [t, i]));
  const json = {
    version: "1.0", truncation: null, padding: null, pre_tokenizer: null, post_processor: null,
    added_tokens: [{ id: 0, content: "<unk>", single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
    normalizer: { type: "Sequence", normalizers: [{ type: "Prepend", prepend: "▁" }, { type: "Replace", pattern: { String: " " }, content: "▁" }] },
    decoder: { type: "Sequence", decoders: [{ type: "Replace", pattern: { String: "▁" }, content: " " }, { type: "ByteFallback" },
      { type: "Fuse" }, { type: "Strip", content: " ", start: 1, stop: 0 }] },
    model: { type: "BPE", dropout: null, unk_token: "<unk>", continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: true, byte_fallback: true, ignore_merges: false, vocab, merges: [] },
  };
  await mkdir(path.join(scratch, "bom", "base"), { recursive: true });
  await writeFile(path.join(scratch, "bom", "base", "tokenizer.json"), JSON.stringify(json));
  const bom = await loadTokenizer(path.join(scratch, "bom"));
  const [a, ef, bb, bf, b] = [vocab.a, vocab["<0xEF>"], vocab["<0xBB>"], vocab["<0xBF>"], vocab.b];
  assert.equal(bom.decode([a, ef, bb, bf, b]), "a\uFEFFb");
  assert.equal(bom.decode([ef, bb, bf, a]), "\uFEFFa");
  assert.deepEqual(bom.encode("a\uFEFFb").ids, [vocab["▁"], a, ef, bb, bf, b]);
  const minilm = await loadTokenizer(path.join(FIXTURES, "minilm"));
  for (const tokenizer of [bom, minilm]) {
    assert.throws(() => tokenizer.encode("caf\uD83D"), (e) => e instanceof EdgePeftError &&
      e.message === 'text "caf\\ud83d" holds half of a character (a lone surrogate); pass whole characters');
    assert.throws(() => tokenizer.encode("ok", { text_pair: "\uDE00" }), EdgePeftError);
  }
  for (const odd of [null, undefined, 123]) {  // a TypeError from the library, or no ids at all (123)
    assert.throws(() => minilm.encode(odd), (e) => e instanceof EdgePeftError && /encode takes a text \(a string\), got/.test(e.message));
  }
  assert.deepEqual(bom.encode("a😀").ids, [vocab["▁"], a, ...[0xF0, 0x9F, 0x98, 0x80].map((x) => x + 4)]);  // a pair is taken
});
