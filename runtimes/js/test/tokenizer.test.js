// The JavaScript tokenizer against the Python runtime's (the Rust library, as transformers) on tokenizers a test
// builds with Python: where the library read otherwise, mended (ids and text equal) or refused (named).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";

import { EdgePeftError } from "../src/runtime.js";
import { loadTokenizer } from "../src/node.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const PYTHON = process.env.PYTHON || (existsSync(path.join(REPO, ".venv/bin/python")) ? path.join(REPO, ".venv/bin/python") : "python3");
const scratch = await mkdtemp(path.join(os.tmpdir(), "edgepeft-js-tokenizer-"));
after(() => rm(scratch, { recursive: true, force: true }));

// Writes OUT/base/tokenizer.json for each case and prints what the Python runtime encodes and decodes of it.
const BUILD = String.raw`
import json, os, sys
from tokenizers import Tokenizer, models, pre_tokenizers, AddedToken
import edgepeft
from edgepeft.runtimes.text import TextTokenizer
root, texts, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
def minilm(*added):
    tok = Tokenizer.from_file(os.path.join(edgepeft.minilm_path(), "tokenizer.json"))
    tok.add_tokens(list(added))
    return tok
def fused(model):
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok
cases = {
    "normalized-added": minilm("COVID", "Hello World", "\u91ce\u5bb6"),
    "fuse-bpe": fused(models.BPE({"<unk>": 0, "a": 1, "b": 2, "ab": 3}, [("a", "b")], unk_token="<unk>", fuse_unk=True)),
    "fuse-unigram": fused(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -1.0), ("ab", -0.5)], 0)),
    "astral-added": minilm("\U00020BB7\u91ce\u5bb6"),
    "blank-beside-strip": minilm(AddedToken("  ", normalized=False), AddedToken("<m>", lstrip=True, normalized=False)),
}
out = {}
for name, tok in cases.items():
    base = os.path.join(root, name, "base")
    os.makedirs(base, exist_ok=True)
    tok.save(os.path.join(base, "tokenizer.json"))
    rt = TextTokenizer(base)
    out[name] = {"ids": {t: rt.encode(t)[0][0].tolist() for t in texts},
                 "decoded": [rt.decode(row) for row in ids], "raw": [rt.decode(row, skip_special_tokens=False) for row in ids]}
print(json.dumps(out))
`;
const TEXTS = ["COVID cases", "hello world Hello World", "\u91ce\u5bb6 ok", "\u03a9 \u03a9", "ab \u03a9\u03a9 \u03a9 ab", "b a ba"];
const IDS = [[101, 30522, 3572, 102], [101, 30523, 102], [101, 30524, 102], [101, 7592, 30600, 99999, 102], [0, 3, 0]];
const python = JSON.parse(execFileSync(PYTHON, ["-c", BUILD, scratch, JSON.stringify(TEXTS), JSON.stringify(IDS)],
  { env: { ...process.env, HF_HUB_OFFLINE: "1" } }));

test("added tokens that are normalized decode as the Rust library decodes them, and ids past the vocabulary as nothing", async () => {
  // the library decoded "COVID" as "COVID" (Python: "covid"), and an id past the vocabulary as [UNK]
  const tokenizer = await loadTokenizer(path.join(scratch, "normalized-added"));
  for (const text of TEXTS) assert.deepEqual(tokenizer.encode(text).ids, python["normalized-added"].ids[text], text);
  IDS.slice(0, 4).forEach((ids, i) => {
    assert.equal(tokenizer.decode(ids), python["normalized-added"].decoded[i], JSON.stringify(ids));
    assert.equal(tokenizer.decode(ids, { skip_special_tokens: false }), python["normalized-added"].raw[i], JSON.stringify(ids));
  });
});

test("unknown pieces are fused within a word, not across words, for BPE and Unigram models", async () => {
  for (const name of ["fuse-bpe", "fuse-unigram"]) {  // "Ω Ω" was one unknown token here, two in Python
    const tokenizer = await loadTokenizer(path.join(scratch, name));
    for (const text of TEXTS.slice(3)) assert.deepEqual(tokenizer.encode(text).ids, python[name].ids[text], `${name}: ${text}`);
    assert.equal(tokenizer.decode(IDS[4], { skip_special_tokens: false }), python[name].raw[4], name);
  }
  assert.deepEqual(python["fuse-bpe"].ids["\u03a9 \u03a9"], [0, 0]);  // the case that differed
});

test("added tokens the library would match otherwise are refused, naming what to do", async () => {
  const refused = async (name, pattern) => assert.rejects(loadTokenizer(path.join(scratch, name)), (e) => {
    assert.ok(e instanceof EdgePeftError, e.message);
    assert.match(e.message, pattern);
    return true;
  });
  // "𠮷野家" was never matched (the ideograph spaced out first); "  " beside "<m>" was trimmed away
  await refused("astral-added", /base\/tokenizer.json: added token "\u{20BB7}野家" \(a CJK ideograph past U\+FFFF\) is not in the JavaScript tokenizer; pass token ids/u);
  await refused("blank-beside-strip", /base\/tokenizer.json: added token " {2}" \(whitespace\) beside "<m>" \(lstrip\/rstrip\) is not in the JavaScript tokenizer/);
  // a template's special token as other ids than the vocabulary's ([SEP] as 999: Rust gives 999, this gave 102), and
  // two processors joining a pair (this lost the second text's types and the second template's tokens)
  const minilm = JSON.parse(await readFile(path.join(scratch, "normalized-added", "base", "tokenizer.json"), "utf8"));
  const sep = { ...minilm, post_processor: structuredClone(minilm.post_processor) };
  sep.post_processor.special_tokens["[SEP]"].ids = [999];
  const twice = { ...minilm, post_processor: { type: "Sequence", processors: [
    { type: "BertProcessing", sep: ["[SEP]", 102], cls: ["[CLS]", 101] }, minilm.post_processor] } };
  for (const [name, json] of [["template-ids", sep], ["joined-twice", twice]]) {
    await mkdir(path.join(scratch, name, "base"), { recursive: true });
    await writeFile(path.join(scratch, name, "base", "tokenizer.json"), JSON.stringify(json));
  }
  await refused("template-ids", /base\/tokenizer.json: the post-processor's special token "\[SEP\]" as ids \[999\] \(its vocabulary's id here\) is not in the JavaScript tokenizer; pass token ids/);
  await refused("joined-twice", /base\/tokenizer.json: a post-processor joining a pair twice \(a Sequence\) is not in the JavaScript tokenizer; pass token ids/);
  // a template naming a token the file lacks: Python refuses the file at load (the Rust library panics at each encode)
  const json = JSON.parse(await readFile(path.join(scratch, "normalized-added", "base", "tokenizer.json"), "utf8"));
  json.post_processor.single.push({ SpecialToken: { id: "<zz>", type_id: 0 } });
  await mkdir(path.join(scratch, "template-unlisted", "base"), { recursive: true });
  await writeFile(path.join(scratch, "template-unlisted", "base", "tokenizer.json"), JSON.stringify(json));
  json.post_processor.single.pop();  // in the pair template only: Python refuses it too (it encodes a pair at load; a
  json.post_processor.pair.push({ SpecialToken: { id: "<zz>", type_id: 1 } });  // pair panicked), this took the vocab's
  for (const task of ["seq-cls", "causal-lm"]) {  // a classifier's pairs only: another export never encodes one
    await mkdir(path.join(scratch, `pair-unlisted-${task}`, "base"), { recursive: true });
    await writeFile(path.join(scratch, `pair-unlisted-${task}`, "base", "tokenizer.json"), JSON.stringify(json));
    await writeFile(path.join(scratch, `pair-unlisted-${task}`, "base", "edgepeft.json"), JSON.stringify({ task }));
  }
  assert.ok((await loadTokenizer(path.join(scratch, "pair-unlisted-causal-lm"))).encode("hello").ids.length > 0);
  for (const name of ["template-unlisted", "pair-unlisted-seq-cls"]) {
    await refused(name, /base\/tokenizer.json: its post-processor names the special token "<zz>", which its special_tokens lack \(the tokenizers library cannot encode with it\); copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder$/);
  }
});

// Decoders the library read otherwise than the Rust one (found by a hunt): each case's ids decoded by the Python runtime.
const DECODERS = String.raw`
import json, os, sys
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from edgepeft.runtimes.text import TextTokenizer
root, out = sys.argv[1], {}
words = {"<unk>": 0, "<s>": 1, "\u2581Hello": 2, "\u2581world": 3, "\u2581of\u2581the": 4, "Hi": 5}
for scheme in ("never", "first", "always"):
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.add_special_tokens(["<s>"])
    tok.decoder = decoders.Metaspace(prepend_scheme=scheme)
    out[scheme] = tok
alphabet = pre_tokenizers.ByteLevel.alphabet()
tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.add_tokens(["caf\u00e9", "\u00b15", "\u91ce"])
out["bytelevel-added"] = tok
tok = Tokenizer(models.BPE({"<unk>": 0, "a": 1, **{f"<0x{b:02X}>": 2 + i for i, b in enumerate((0x0A, 0xDA, 0xA0, 0x46, 0xC3, 0xA9))}},
                           [], unk_token="<unk>", byte_fallback=True))
tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
out["bytefallback"] = tok
out["unigram-bytes"] = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("<0xC3>", -2.0), ("<0xA9>", -2.0)], 0, byte_fallback=True))
said = {}
for name, tok in out.items():
    base = os.path.join(root, name, "base")
    os.makedirs(base, exist_ok=True)
    tok.save(os.path.join(base, "tokenizer.json"))
    if name != "unigram-bytes":
        rt = TextTokenizer(base)
        rows = [[2, 3], [4, 3], [1, 4, 3], [5, 2]] if name in ("never", "first", "always") else \
            [[2, 3], [4, 5], [1, 6, 7, 1], [3, 1, 2]] if name == "bytefallback" else [rt.encode(t)[0][0].tolist() for t in ("a caf\u00e9 \u00b15", "\u91ce ok caf\u00e9")]
        said[name] = [[row, rt.decode(row), rt.decode(row, skip_special_tokens=False)] for row in rows]
print(json.dumps(said))
`;

test("Metaspace, ByteLevel and ByteFallback decode as the Rust library decodes; a Unigram model with byte_fallback is refused", async () => {
  const root = path.join(scratch, "decoders");
  const python = JSON.parse(execFileSync(PYTHON, ["-c", DECODERS, root], { env: { ...process.env, HF_HUB_OFFLINE: "1" } }));
  // Metaspace dropped one space of the first token whatever its prepend_scheme ("never" keeps it; the others drop
  // every "▁" of it: "of▁the" is "ofthe"); ByteLevel passed an added "café" through ("caf\uFFFD" in Python)
  for (const [name, rows] of Object.entries(python)) {
    const tokenizer = await loadTokenizer(path.join(root, name));
    for (const [ids, text, raw] of rows) {
      assert.equal(tokenizer.decode(ids), text, `${name} ${ids}`);
      assert.equal(tokenizer.decode(ids, { skip_special_tokens: false }), raw, `${name} ${ids}`);
    }
  }
  assert.deepEqual(python.first.map((r) => r[1]), ["Hello world", "ofthe world", "ofthe world", "Hi Hello"]);
  assert.equal(python["bytelevel-added"][0][1], "a caf\uFFFD \uFFFD5");  // the case that differed
  // a byte run that is not UTF-8 is one U+FFFD a byte token in Rust; the library kept the run's valid bytes ("\n\uFFFD")
  assert.deepEqual(python.bytefallback.map((r) => r[1]), ["\uFFFD\uFFFD", "\uFFFD\uFFFD", "a\u00e9a", "\uFFFDa\n"]);
  // the library encoded "é" as <unk> (no byte fallback in its Unigram), where the Rust one spells its bytes
  await assert.rejects(loadTokenizer(path.join(root, "unigram-bytes")), (e) => e instanceof EdgePeftError &&
    /unigram-bytes\/base\/tokenizer.json: a Unigram model with byte_fallback .* is not in the JavaScript tokenizer; pass token ids/.test(e.message));
});

// Split and Punctuation behaviors, and a WordLevel model's own unk_token (found by a hunt): each word of the Python
// pre-tokenizer its own id, so a word cut elsewhere is another id or <unk>.
const SPLITS = String.raw`
import json, os, sys
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers as pre
from edgepeft.runtimes.text import TextTokenizer
root, texts, out = sys.argv[1], json.loads(sys.argv[2]), {}
cases = {f"split-{b}": pre.Split("-", b) for b in ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")}
cases.update({f"punctuation-{b}": pre.Punctuation(b) for b in ("isolated", "removed", "merged_with_previous", "merged_with_next", "contiguous")})
cases["split-invert"] = pre.Split(Regex("[ab]+"), "isolated", invert=True)
cases["sequence"] = pre.Sequence([pre.WhitespaceSplit(), pre.Split(Regex("\\d"), "merged_with_next")])
cases["split-empty-match"] = pre.Split(Regex("\\d*"), "merged_with_previous")  # a pattern that matches "" too
cases["split-llama3"] = pre.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), "isolated")
for name, p in cases.items():
    words = sorted({w for t in texts for w, _ in p.pre_tokenize_str(t)})
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = p
    base = os.path.join(root, name, "base")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(base)  # its config names no unk_token
    rt = TextTokenizer(base)
    out[name] = {t: rt.encode(t)[0][0].tolist() for t in texts + ["a zz b"]}
print(json.dumps(out))
`;

test("Split and Punctuation pre-tokenizers cut words as the Rust library does, and a WordLevel model's unknown word is its unk", async () => {
  const texts = ["a-b--c", "-a-", "a!b!!c?", "¿qué?", "ab12cd34 e5", "x--y-", "--", "no delimiters", "I'm 2024's\r\n  best!"];
  const root = path.join(scratch, "splits");
  const python = JSON.parse(execFileSync(PYTHON, ["-c", SPLITS, root, JSON.stringify(texts)], { env: { ...process.env, HF_HUB_OFFLINE: "1" } }));
  for (const [name, want] of Object.entries(python)) {
    const tokenizer = await loadTokenizer(path.join(root, name));
    for (const [text, ids] of Object.entries(want)) assert.deepEqual(tokenizer.encode(text).ids, ids, `${name}: ${text}`);
  }
  assert.ok(python["split-isolated"]["a zz b"].includes(0));  // the unknown word: null here before
  assert.notDeepEqual(python["split-merged_with_previous"]["a-b--c"], python["split-isolated"]["a-b--c"]);
});

// A normalized special token, a Metaspace pre-tokenizer that splits (the Rust default) and a BPE model asked to tidy:
// each tokenizer's ids and decoded text as the Python runtime gives them (and transformers: its decode ignores
// clean_up_tokenization_spaces for BPE).
const BUILD_MORE = String.raw`
import json, os, sys
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
import edgepeft
from edgepeft.runtimes.text import TextTokenizer
root = sys.argv[1]
special = Tokenizer.from_file(os.path.join(edgepeft.minilm_path(), "tokenizer.json"))
special.add_special_tokens([AddedToken("[URL]", normalized=True, special=True)])
vocab = {"<unk>": 0, "\u2581": 1, **{c: 2 + i for i, c in enumerate("defnrtu():1")}}
merges = [("\u2581", "\u2581"), ("\u2581\u2581", "\u2581\u2581"), ("\u2581", "r"), ("e", "t"), ("\u2581r", "et"),
          ("u", "r"), ("\u2581ret", "ur"), ("\u2581retur", "n"), ("\u2581", "d"), ("e", "f"), ("\u2581d", "ef")]
for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
split = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
split.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
split.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
bpe = Tokenizer(models.BPE({c: i for i, c in enumerate("Helo,wrd.I'ntk! ")}, []))
out = {}
for name, tok, texts, config in [("normalized-special", special, ["see [URL] now"], {}),
                                 ("metaspace-split", split, ["def f():\n    return 1", "  def  return"], {}),
                                 ("bpe-tidy", bpe, ["Hello , world . I do n't know !"], {"clean_up_tokenization_spaces": True})]:
    base = os.path.join(root, name, "base")
    os.makedirs(base, exist_ok=True)
    tok.save(os.path.join(base, "tokenizer.json"))
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    rt = TextTokenizer(base)
    rows = [rt.encode(t, add_special_tokens=True)[0][0].tolist() for t in texts]
    out[name] = {"texts": texts, "ids": rows, "decoded": [rt.decode(r) for r in rows],
                 "raw": [rt.decode(r, skip_special_tokens=False) for r in rows]}
print(json.dumps(out))
`;

test("a normalized special token decodes as its normalized text, a splitting Metaspace cuts at each \u2581, BPE is never tidied", async () => {
  const more = JSON.parse(execFileSync(PYTHON, ["-c", BUILD_MORE, scratch], { env: { ...process.env, HF_HUB_OFFLINE: "1" } }));
  assert.deepEqual(more["normalized-special"].decoded, ["see [url] now"]);  // JS: "see now", raw "[URL]"
  assert.deepEqual(more["metaspace-split"].ids[0].slice(-6), [1, 1, 1, 20, 1, 12]);  // "\u2581" x3, "\u2581return": JS "\u2581\u2581\u2581\u2581"
  for (const [name, { texts, ids, decoded, raw }] of Object.entries(more)) {
    const tokenizer = await loadTokenizer(path.join(scratch, name));
    texts.forEach((text, i) => {
      assert.deepEqual(tokenizer.encode(text).ids, ids[i], `${name}: ${text}`);
      assert.equal(tokenizer.decode(ids[i]), decoded[i], name);
      assert.equal(tokenizer.decode(ids[i], { skip_special_tokens: false }), raw[i], name);
      assert.equal(tokenizer.decode(ids[i], { clean_up_tokenization_spaces: true }), decoded[i], name);  // BPE: tidied
    });
  }
});
