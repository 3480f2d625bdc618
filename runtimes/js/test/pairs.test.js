// Text pairs (a cross-encoder's query and passage): a seq-cls BERT's graph takes token_type_ids, bound by forward's
// tokenTypeIds (zeros where a call gives none), checked and refused as the Python runtime checks and refuses them
// (runtimes/inputs.py's check_token_types, base_checks.py), on the MiniLM classifiers and a tiny BERT's (a prompt
// adapter's virtual tokens of type 0 inside the graph) tests/test_js_fixtures.py exports; and the tokenizer's pair
// encoding, ids and types, as the Python runtime's (the Rust library's).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, readdir, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";
import * as ortWeb from "onnxruntime-web";

import { EdgePeftError, classify } from "../src/runtime.js";
import { checkTokenTypes } from "../src/inputs.js";
import { loadTokenizer, openFolder } from "../src/node.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const PYTHON = process.env.PYTHON || (existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");
const expected = JSON.parse(await readFile(path.join(FIXTURES, "expected.json"), "utf8"));
const PAIRS = expected.minilm.pairs;
const MINILM = path.join(FIXTURES, "minilm");
const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-pairs-"));
after(() => rm(scratch, { recursive: true, force: true }));
ortWeb.env.wasm.numThreads = 1;

const quoted = (s) => s.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
const refuses = (call, pattern) => assert.rejects(call, (e) => {
  assert.ok(e instanceof EdgePeftError, `${e.constructor.name}: ${e.message}`);
  assert.match(e.message, pattern);
  return true;
});

/** The largest |difference| between a tensor and Python's rows of the same values. */
function maxDiff(tensor, rows) {
  const flat = rows.flat(Infinity);
  assert.equal(tensor.data.length, flat.length);
  return flat.reduce((worst, v, i) => Math.max(worst, Math.abs(tensor.data[i] - v)), 0);
}

/** The MiniLM export with its base manifest changed by edit(json): the other files linked, not copied (91 MB). */
async function edited(name, edit) {
  const out = path.join(scratch, name), base = path.join(out, "base");
  await mkdir(base, { recursive: true });
  for (const file of await readdir(path.join(MINILM, "base"))) {
    if (file !== "edgepeft.json") await symlink(path.join(MINILM, "base", file), path.join(base, file));
  }
  await symlink(path.join(MINILM, "adapters"), path.join(out, "adapters"));
  const manifest = JSON.parse(await readFile(path.join(MINILM, "base", "edgepeft.json"), "utf8"));
  edit(manifest);
  await writeFile(path.join(base, "edgepeft.json"), JSON.stringify(manifest));
  return out;
}

for (const [label, ort, tolerance] of [["onnxruntime-node", ortNode, 1e-5], ["onnxruntime-web (wasm)", ortWeb, 1e-4]]) {
  test(`${label}: text pairs with their token types give the Python runtime's logits and classes; none given: zeros`, async () => {
    for (const fixture of ["minilm", "bert_pairs"]) {
      const rt = await openFolder(ort, path.join(FIXTURES, fixture));
      assert.equal(rt.typeVocabSize, 2);
      const want = expected[fixture].pairs, adapters = Object.keys(want.forward);
      for (const adapter of adapters) await rt.loadAdapter(adapter);
      const { ids, mask, types } = want;
      for (const adapter of [...adapters, adapters[0]]) {  // switched every call
        const { logits } = await rt.forward(ids, mask, { adapter, tokenTypeIds: types });
        assert.ok(maxDiff(logits, want.forward[adapter]) <= tolerance, `${fixture} ${adapter}: ${maxDiff(logits, want.forward[adapter])}`);
        want.classify[adapter].forEach((py, row) => {
          const [top] = classify(logits, rt.labels(adapter), row, rt.problemType);
          assert.equal(top.label, py.label);
          assert.ok(Math.abs(top.score - py.score) <= 1e-4, `${fixture} ${adapter} row ${row}`);
        });
        // no types: every token of type 0, as the Python runtime's forward without them (and as explicit zeros)
        const untyped = (await rt.forward(ids, mask, { adapter })).logits;
        assert.ok(maxDiff(untyped, want.untyped[adapter]) <= tolerance, `${fixture} ${adapter} untyped`);
        const zeros = (await rt.forward(ids, mask, { adapter, tokenTypeIds: types.map((r) => r.map(() => 0)) })).logits;
        assert.deepEqual(Array.from(zeros.data), Array.from(untyped.data));
      }
    }
    const rt = await openFolder(ort, MINILM);
    await rt.loadAdapter("sentiment");
    // the docs' way: the JavaScript tokenizer's pair, one row, its types as given (typed arrays and bigints taken too)
    const tokenizer = await loadTokenizer(MINILM);
    const pair = tokenizer.encode(PAIRS.texts[0], { text_pair: PAIRS.text_pairs[0] });
    for (const tokenTypeIds of [[pair.token_type_ids], pair.token_type_ids, [BigInt64Array.from(pair.token_type_ids, BigInt)]]) {
      const { logits } = await rt.forward([pair.ids], [pair.attention_mask], { adapter: "sentiment", tokenTypeIds });
      assert.ok(maxDiff(logits, PAIRS.forward.sentiment[0]) <= tolerance);
    }
    // an export whose graph takes no types (a decoder's): all-zero types are taken and change nothing, as in Python
    const llama = await openFolder(ort, path.join(FIXTURES, "llama"));
    assert.equal(llama.typeVocabSize, null);
    const plain = (await llama.forward([[5, 6, 7]])).logits;
    assert.deepEqual(Array.from((await llama.forward([[5, 6, 7]], null, { tokenTypeIds: [[0, 0, 0]] })).logits.data), Array.from(plain.data));
  });
}

test("the tokenizer encodes a pair as the Python runtime: its ids and types, an empty second text no pair", async () => {
  for (const fixture of ["minilm", "bert_pairs"]) {  // WordPiece with BERT's template, byte-level BPE with "$A $B:1"
    const tokenizer = await loadTokenizer(path.join(FIXTURES, fixture));
    const { texts, text_pairs: pairs, tokens } = expected[fixture].pairs;
    tokens.forEach((want, i) => {
      const got = tokenizer.encode(texts[i], pairs[i] === null ? { return_token_type_ids: true } : { text_pair: pairs[i] });
      assert.deepEqual([got.ids, got.token_type_ids], [want.ids, want.types], `${fixture}: ${texts[i]} | ${pairs[i]}`);
    });
  }
  const tokenizer = await loadTokenizer(MINILM);
  // a pair's types come with it unless left out; a text alone gives none unless asked, as the library does
  assert.equal(tokenizer.encode("a", { text_pair: "b", return_token_type_ids: false }).token_type_ids, undefined);
  assert.equal(tokenizer.encode("a").token_type_ids, undefined);
  assert.throws(() => tokenizer.encode("a", { text_pair: 5 }), (e) => e instanceof EdgePeftError && /encode takes a text \(a string\), got 5/.test(e.message));
});

// Post-processors the library joined or typed otherwise than the Rust one: the MiniLM tokenizer with each, as the
// Python runtime encodes pairs with it (encode_pairs).
const BUILD = String.raw`
import json, os, sys
from tokenizers import Tokenizer, processors
import edgepeft
from edgepeft.runtimes.text import TextTokenizer
root, pairs = sys.argv[1], json.loads(sys.argv[2])
template = processors.TemplateProcessing(single="[CLS] $A", pair="[CLS] $A [SEP]:1 $B:1", special_tokens=[("[CLS]", 101), ("[SEP]", 102)])
cases = {"none": None, "byte-level": processors.ByteLevel(trim_offsets=False),
         "roberta": processors.RobertaProcessing(("[SEP]", 102), ("[CLS]", 101)),
         "bert": processors.BertProcessing(("[SEP]", 102), ("[CLS]", 101)),
         "sequence": processors.Sequence([processors.ByteLevel(trim_offsets=False), template]),
         "sequence-template-first": processors.Sequence([template, processors.ByteLevel(trim_offsets=False)]),
         "sequence-byte-level": processors.Sequence([processors.ByteLevel(trim_offsets=False)])}
out = {}
for name, processor in cases.items():
    tok = Tokenizer.from_file(os.path.join(edgepeft.minilm_path(), "tokenizer.json"))
    tok.post_processor = processor
    base = os.path.join(root, name, "base")
    os.makedirs(base, exist_ok=True)
    tok.save(os.path.join(base, "tokenizer.json"))
    rt = TextTokenizer(base)
    out[name] = [[row[0].tolist() for row in rt.encode_pairs(a, b)[::2]] for a, b in pairs]  # ids, types
print(json.dumps(out))
`;

test("pairs under each post-processor are joined and typed as the Rust library joins them (ByteLevel's dropped the second)", async () => {
  const pairs = [["how tall is everest", "very tall"], ["a b", ""], ["one text", null]];
  const python = JSON.parse(execFileSync(PYTHON, ["-c", BUILD, scratch, JSON.stringify(pairs)], { env: { ...process.env, HF_HUB_OFFLINE: "1" } }));
  for (const [name, want] of Object.entries(python)) {
    const tokenizer = await loadTokenizer(path.join(scratch, name));
    pairs.forEach(([text, pair], i) => {
      const got = tokenizer.encode(text, { text_pair: pair, return_token_type_ids: true });
      assert.deepEqual([got.ids, got.token_type_ids], want[i], `${name}: ${text} | ${pair}`);
    });
  }
});

test("token types are refused where they are not the ids' rows of the model's types, as the Python runtime refuses them", async () => {
  const rt = await openFolder(ortNode, MINILM);
  const ids = [[101, 1037, 102, 1038, 102]], mask = [[1, 1, 1, 1, 1]];
  const forward = (tokenTypeIds) => rt.forward(ids, mask, { tokenTypeIds });
  await refuses(forward([[0, 0, 0, 2, 2]]), /^token type 2 is outside the model's \[0, 2\); give 0 for a text's \(or a pair's first\) tokens, 1 for a pair's second$/);
  await refuses(forward([[0, -1, 0, 1, 1]]), /^token type -1 is outside the model's \[0, 2\)/);
  await refuses(forward([[0, 0, 1, 1]]), /^tokenTypeIds must have the shape of ids \(1 rows of 5\); they must match$/);
  await refuses(forward([[0, 0, 0, 1, 1], [0, 0, 0, 1, 1]]), /^tokenTypeIds must have the shape of ids/);
  await refuses(forward([Float32Array.from([0, 0, 0, 1, 1])]), /^tokenTypeIds must be token types \(integers: .*\), got Float32Array$/);
  await refuses(forward([[0, 0, 0, 0.5, 1]]), /^tokenTypeIds must hold whole numbers; got 0.5$/);
  await refuses(forward([[0, 0, 0, true, 1]]), /^tokenTypeIds must hold whole numbers; got true$/);
  await refuses(forward("0 0 0 1 1"), /^tokenTypeIds must be a non-empty array of rows/);
  await refuses(rt.forward(ids, mask, { token_type_ids: [[0, 0, 0, 1, 1]] }),
    /^forward has no option token_type_ids; its options are adapter, tokenTypeIds \(tokenTypeIds: camelCase here\)$/);
  // an export whose graph takes none (a decoder's, an encoder's features, or a BERT classifier exported before
  // edgepeft served pairs): any type but 0 is refused, naming the export and the fix
  const none = (out) => new RegExp(`^${quoted(path.join(out, "base"))}: this export takes no token_type_ids \\(only a ` +
    "seq-cls export of a model with token types, BERT's, does; for one exported before edgepeft served text pairs, " +
    "export an adapter into it again \\(its base is then written with token types\\), or every adapter into a fresh " +
    "--out folder\\); pass none$");
  // a --merge export takes no adapter into it: the merge is written again
  assert.throws(() => checkTokenTypes([[0, 1]], [[5, 6]], null, "OUT/base", { merged_adapter: "lora" }), (e) => e instanceof EdgePeftError &&
    /served text pairs, export it again with --merge --overwrite \(its base is then written with token types\)\); pass none$/.test(e.message));
  // a review across versions: an earlier edgepeft's export (format 2, or no generation record) takes no new adapter
  for (const older of [{ format_version: 2, generation: {} }, { format_version: 3 }]) {
    assert.throws(() => checkTokenTypes([[0, 1]], [[5, 6]], null, "OUT/base", older), (e) => e instanceof EdgePeftError &&
      /served text pairs, export every adapter into a fresh --out folder \(an earlier edgepeft's export takes no new adapter\)\); pass none$/.test(e.message));
  }
  for (const fixture of ["llama", "bert_prefix"]) {
    const other = await openFolder(ortNode, path.join(FIXTURES, fixture));
    await refuses(other.forward([[5, 6, 7]], null, { tokenTypeIds: [[0, 1, 1]] }), none(path.join(FIXTURES, fixture)));
  }
});

test("a base manifest's type_vocab_size is checked as runtimes/base_checks.py checks it", async () => {
  const REEXPORT_BASE = quoted("copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder");
  const refused = async (name, edit, message) => {
    const out = await edited(name, edit);
    await refuses(openFolder(ortNode, out), new RegExp(`^${quoted(path.join(out, "base", "edgepeft.json"))}: ${message}; ${REEXPORT_BASE}$`));
  };
  await refused("types-string", (m) => { m.type_vocab_size = "2"; }, 'field type_vocab_size must be a whole number, got "2"');
  await refused("types-zero", (m) => { m.type_vocab_size = 0; }, "field type_vocab_size must be at least 1 \\(or null\\), got 0");
  const unstated = "field inputs lists token_type_ids; field type_vocab_size must give its token types";
  await refused("types-null", (m) => { m.type_vocab_size = null; }, unstated);
  await refused("types-absent", (m) => { delete m.type_vocab_size; }, unstated);
  // a manifest that leaves out an input the graph takes: refused at open, as runtimes/base_checks.py refuses it (it
  // was ONNX Runtime's missing-input error at every call)
  await refused("types-unlisted", (m) => { m.type_vocab_size = null; delete m.inputs.token_type_ids; },
    "the graph takes token_type_ids, which field inputs does not list");
});

test("the tokenizer's options are checked: a camelCase textPair, a string flag or max_length is refused, not dropped", async () => {
  // found by a hunt: encode("q", { textPair: "p" }) encoded the query alone (a cross-encoder scored it without its
  // passage), { add_special_tokens: "false" } added them, { max_length: 4 } cut nothing, decode's skipSpecialTokens
  const tok = await loadTokenizer(MINILM);
  const refused = [
    [() => tok.encode("q", { textPair: "p" }), "encode has no option textPair; its options are text_pair, add_special_tokens, return_token_type_ids (text_pair: snake_case here)"],
    [() => tok.encode("a b", { add_special_tokens: "false" }), "encode's add_special_tokens must be true or false, got \"false\""],
    [() => tok.encode("a b c", { max_length: 4 }), "encode has no option max_length; its options are text_pair, add_special_tokens, return_token_type_ids; to cut, slice the ids"],
    [() => tok.encode("a b", { add_special_tokens: null }), "encode's add_special_tokens must be true or false, got null"],
    [() => tok.decode([101, 1037, 102], { skipSpecialTokens: false }), "decode has no option skipSpecialTokens; its options are skip_special_tokens, clean_up_tokenization_spaces (skip_special_tokens: snake_case here)"],
    [() => tok.encode("a b", "x"), "encode's options must be an object such as { text_pair: ... }; got \"x\""],
  ];
  for (const [call, said] of refused) {  // the cut's hint for a cut's option alone
    assert.throws(call, (e) => e instanceof EdgePeftError && e.message.startsWith(said) &&
      e.message.includes("to cut") === said.includes("to cut"), said);
  }
  assert.equal(tok.decode([101, 1037, 102], { skip_special_tokens: undefined }), "a");  // the default: it kept them
  assert.deepEqual(tok.encode("q", { text_pair: "p" }).token_type_ids, [0, 0, 0, 1, 1]);
  assert.equal(tok.decode([101, 1037, 102], { skip_special_tokens: false }), "[CLS] a [SEP]");
  assert.equal(tok.encode("a b", { add_special_tokens: false }).ids.length, 2);
});
