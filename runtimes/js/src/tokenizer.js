// The tokenizer exported with the base (tokenizer.json, tokenizer_config.json) in @huggingface/tokenizers, giving the
// ids and text the Python runtime gives (the Rust tokenizers library, as transformers): where this library differs
// and the difference can be mended, it is mended here; where it cannot, loadTokenizer refuses the tokenizer, naming
// what to do (pass ids the Python runtime encodes). Differences in rare characters are listed in docs/web.md.
import { EdgePeftError, OPTIONAL, REEXPORT_BASE, checkOptions, described, firstLine, readJson } from "./checks.js";
import { floatArray } from "./inputs.js";

const CUT_IDS = "; to cut, slice the ids (the Python runtime's encode takes max_length)";
const PASS_IDS = "pass token ids encoded by the Python runtime (rt.tokenizer.encode) or transformers";

/** `ids` (an array of numbers or bigints, or an integer typed array: what ONNX Runtime hands back) as plain numbers,
 * as the Python runtime's decode takes them; anything else is named (the library said "must be non-empty"). A float
 * typed array is refused as Python refuses a float array, whole numbers or not (a float tensor is no ids). */
function tokenIds(ids) {
  const integers = Array.isArray(ids) || ArrayBuffer.isView(ids) && !(ids instanceof DataView) && !floatArray(ids);
  const list = integers ? Array.from(ids, (v) => typeof v === "bigint" ? Number(v) : v) : null;
  if (list === null || !list.every((v) => Number.isInteger(v) && v >= 0 && v < 2 ** 32)) {
    const shown = list === null ? (ArrayBuffer.isView(ids) ? `a ${ids.constructor.name}` : String(ids)) : described(list);
    throw new EdgePeftError(`decode takes one sequence of token ids (integers >= 0), got ${shown.slice(0, 80)}`);
  }
  return list;
}

// CJK ideographs past U+FFFF, which the Rust BertNormalizer spaces out and this library's does not (it reads UTF-16
// units): the Rust library's ranges (0x2B820-0x2B91F is not among them)
const ASTRAL_CJK = /[\u{20000}-\u{2A6DF}\u{2A700}-\u{2B81F}\u{2B920}-\u{2CEAF}\u{2F800}-\u{2FA1F}]/gu;
const HAS_ASTRAL_CJK = new RegExp(ASTRAL_CJK.source, "u");  // a test without the global flag's lastIndex

const bertCjk = (n) => n?.type === "Sequence" ? n.normalizers.some(bertCjk)
  : n?.type === "BertNormalizer" && n.handle_chinese_chars !== false;
/** SentencePiece's character map, which the library ignores (it runs NFKC and a list of its own instead). */
const precompiled = (n) => n?.type === "Sequence" ? n.normalizers.some(precompiled)
  : n?.type === "Precompiled" && Boolean(n.precompiled_charsmap);

/** What this library would encode otherwise than the Rust one, for every text that has it (null: nothing). */
function unlike(json, config) {
  if (config.split_special_tokens === true) return "split_special_tokens (special-token text in a prompt encoded as text)";
  if (json.model?.type === "Unigram" && json.model.byte_fallback) {
    return "a Unigram model with byte_fallback (a character outside its vocabulary encoded as <unk> here)";
  }
  if (precompiled(json.normalizer)) {
    return "a Precompiled normalizer (SentencePiece's character map, approximated here: a zero-width joiner in an " +
      "emoji sequence or decomposed accents become other ids)";
  }
  if (json.model?.type === "BPE" && json.model.continuing_subword_prefix) {
    return `a BPE model with continuing_subword_prefix ${JSON.stringify(json.model.continuing_subword_prefix)}`;
  }
  const added = json.added_tokens ?? [];
  const single = added.find((t) => t.single_word);
  if (single) return `added token ${JSON.stringify(single.content)} with single_word (matched inside words here)`;
  // the library trims an added token of whitespace beside an lstrip or rstrip one, which the Rust one keeps
  const blank = added.find((t) => !t.content.trim()), strips = added.find((t) => t.lstrip || t.rstrip);
  if (blank && strips) return `added token ${JSON.stringify(blank.content)} (whitespace) beside ${JSON.stringify(strips.content)} (lstrip/rstrip)`;
  // CJK ideographs past U+FFFF are spaced out before added tokens are found here (below), after in the Rust library
  const astral = bertCjk(json.normalizer) && added.find((t) => HAS_ASTRAL_CJK.test(t.content));
  if (astral) return `added token ${JSON.stringify(astral.content)} (a CJK ideograph past U+FFFF)`;
  return templated(json);
}

const JOINING = ["TemplateProcessing", "BertProcessing", "RobertaProcessing"];
const processors = (p) => p?.type === "Sequence" ? (p.processors ?? []).flatMap(processors) : p ? [p] : [];

/** A post-processor this library applies otherwise (null: none): a template's special token given other ids than the
 * vocabulary's (the library looks its name up there), or two that join a pair (the second here joined the joined pair
 * as one text: its types and tokens lost). */
function templated(json) {
  const found = processors(json.post_processor);
  if (found.filter((p) => JOINING.includes(p.type)).length > 1) return "a post-processor joining a pair twice (a Sequence)";
  const vocab = json.model?.vocab, added = json.added_tokens ?? [];
  const idOf = (name) => added.find((t) => t.content === name)?.id ??
    (Array.isArray(vocab) ? vocab.findIndex(([piece]) => piece === name) : vocab?.[name]);
  for (const p of found.filter((q) => q.type === "TemplateProcessing")) {
    const other = Object.values(p.special_tokens ?? {}).find((t) => t.ids?.length !== 1 || idOf(t.tokens?.[0]) !== t.ids[0]);
    if (other) return `the post-processor's special token ${JSON.stringify(other.id)} as ids [${other.ids}] (its vocabulary's id here)`;
  }
  return null;
}

/** A special token a template (for one text, or a pair where ``pairs``: a classifier's) names and its table lacks: the
 * Rust library panics at every encode, so the Python runtime refuses the file at load (it encodes one text there, and
 * a pair for a classifier); this library left the token out, or took the vocabulary's. */
const unlisted = (p, pairs) => p?.type === "Sequence" ? (p.processors ?? []).map((q) => unlisted(q, pairs))
  .find((id) => id !== undefined) : p?.type !== "TemplateProcessing" ? undefined : [...(p.single ?? []),
  ...(pairs ? p.pair ?? [] : [])].map((piece) => piece?.SpecialToken?.id)
  .find((id) => id !== undefined && !Object.hasOwn(p.special_tokens ?? {}, id));

const MODELS = ["BPE", "WordPiece", "WordLevel", "Unigram"];
/** What makes the Rust library refuse a file this library reads anyway (null: nothing): a model type it has no
 * reader for (this one guesses BPE), a BPE merge of tokens, or into a token, its vocabulary lacks (skipped here). */
function damaged(model) {
  if (model?.type !== undefined && !MODELS.includes(model.type)) return `its model type ${described(model.type)}`;
  if (model?.type !== "BPE" && !(model?.type === undefined && model?.merges)) return null;
  const vocab = model.vocab ?? {}, merges = Array.isArray(model.merges) ? model.merges : [];
  const prefix = model.continuing_subword_prefix ?? "";  // left off the second part where merged, as the Rust library
  const joined = ([a, b]) => a + (prefix && typeof b === "string" && b.startsWith(prefix) ? b.slice(prefix.length) : b);
  for (const merge of merges) {
    const pair = typeof merge === "string" ? merge.split(" ") : merge;
    const parts = Array.isArray(pair) && pair.length === 2 ? [...pair, joined(pair)] : null;
    const gone = parts ? parts.find((t) => typeof t !== "string" || !Object.hasOwn(vocab, t)) : merge;
    if (gone !== undefined) return `its merge ${described(merge)} of a token its vocabulary lacks (${described(gone)})`;
  }
  return null;
}

export async function tokenizerOf(Tokenizer, loader) {
  const fix = REEXPORT_BASE;
  const manifest = await readJson(loader, "base/edgepeft.json", OPTIONAL, fix) ?? {};
  // a file the export wrote (text_files) missing from a copy: without tokenizer_config.json, texts were cut elsewhere
  const written = Array.isArray(manifest.text_files) && manifest.text_files.includes("tokenizer_config.json");
  const config = await readJson(loader, "base/tokenizer_config.json", written ? `missing; ${fix}` : OPTIONAL, fix);
  const json = await readJson(loader, "base/tokenizer.json", OPTIONAL, fix);  // missing: named below, with more fixes
  for (const [rel, value] of [["base/tokenizer_config.json", config], ["base/tokenizer.json", json]]) {  // null, [], 5
    const added = value?.added_tokens ?? [];  // as the Rust library reads them: objects with their text
    if (typeof value !== "object" || value === null || Array.isArray(value) ||
        !(Array.isArray(added) && added.every((t) => typeof t?.content === "string"))) {
      throw new EdgePeftError(`${loader.where(rel)}: not a tokenizer file the tokenizers library can read; ${fix}`);
    }
  }
  if (!Object.keys(json).length) {  // no export there at all (a mistyped OUT), or an export without a tokenizer
    await readJson(loader, "base/edgepeft.json", null);
    throw new EdgePeftError(`${loader.where("base/tokenizer.json")}: missing (the export has no tokenizer, or the file was ` +
      "removed); copy the export's base folder again, or pass token ids, or export from a base folder that has " +
      "tokenizer.json into a fresh --out folder");
  }
  const broken = damaged(json.model);
  if (broken) {
    throw new EdgePeftError(`${loader.where("base/tokenizer.json")}: not a tokenizer the tokenizers library can read ` +
      `(${broken}); ${fix}`);
  }
  // a pair's template: classifiers'; the model's vocabulary, which every id encode gives must be in
  const { task, vocab_size: vocab } = manifest;
  const missing = unlisted(json.post_processor, task === "seq-cls");
  if (missing !== undefined) {
    throw new EdgePeftError(`${loader.where("base/tokenizer.json")}: its post-processor names the special token ` +
      `${described(missing)}, which its special_tokens lack (the tokenizers library cannot encode with it); ${fix}`);
  }
  const differs = unlike(json, config);
  if (differs) {
    const file = config.split_special_tokens === true ? "base/tokenizer_config.json" : "base/tokenizer.json";
    throw new EdgePeftError(`${loader.where(file)}: ${differs} is not in the JavaScript tokenizer; ${PASS_IDS}`);
  }
  // transformers tidies spaces before punctuation in decoded text only where the config asks, and not for a BPE
  // model unless told to; this library tidies by default, every model (generated text lost the spaces Python keeps)
  const untidy = json.model?.type === "BPE" &&  // a BPE model's text is never tidied, asked for or not (as transformers)
    config.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output !== true;
  const tidy = config.clean_up_tokenization_spaces === true && !untidy;
  let tokenizer;
  try {
    tokenizer = new Tokenizer(json, { ...config, clean_up_tokenization_spaces: tidy });
  } catch (e) {
    throw new EdgePeftError(`${loader.where("base/tokenizer.json")}: the JavaScript tokenizer cannot read it ` +
      `(${firstLine(e)}); ${PASS_IDS}`);
  }
  asRustDecodes(tokenizer.decoder);
  asRustSplits(tokenizer.pre_tokenizer, json.pre_tokenizer);
  asRustReads(tokenizer, json);
  asRustPairs(tokenizer);
  const decode = tokenizer.decode.bind(tokenizer);  // as the Python runtime's decode: special tokens skipped by default
  tokenizer.decode = (ids, options) => {  // an id past the vocabulary decodes to nothing (the library said [UNK])
    const list = tokenIds(ids).filter((id) => tokenizer.model.vocab[id] !== undefined);
    const settings = checkOptions(options, ["skip_special_tokens", "clean_up_tokenization_spaces"], "decode");
    return list.length ? decode(list, { ...settings, skip_special_tokens: settings.skip_special_tokens ?? true,
      ...(untidy && { clean_up_tokenization_spaces: false }) }) : "";
  };
  const encode = tokenizer.encode.bind(tokenizer);
  const cjk = bertCjk(json.normalizer);
  const text = (t) => {
    if (typeof t !== "string") throw new EdgePeftError(`encode takes a text (a string), got ${described(t)}`);
    return wholeCharacters(cjk ? t.replace(ASTRAL_CJK, " $& ") : t);
  };
  // a pair's token types come with it (return_token_type_ids: false leaves them out), as transformers' tokenizer gives
  // them for BERT: a forward without them reads the second text as the first's (tokenTypeIds)
  // an empty pair is none, as transformers' one-text call and the Python runtime's encode_pairs(text, "") read it
  // (options: the library's, snake_case; an unknown one, textPair or max_length, was dropped: the text alone encoded)
  tokenizer.encode = (t, options) => {
    const o = checkOptions(options, ["text_pair", "add_special_tokens", "return_token_type_ids"], "encode",
      Object.keys(options ?? {}).some((k) => /^(max_?length|maxLength|truncation)$/.test(k)) ? CUT_IDS : "");
    return inVocabulary(encode(text(t), o.text_pair == null ? o
      : { return_token_type_ids: true, ...o, text_pair: o.text_pair === "" ? null : text(o.text_pair) }));
  };
  // a token added to the tokenizer and not to the model's embeddings: forward said "outside the vocabulary; tokenize
  // with the base model's tokenizer", which the app had done (as Python's tokenizer_ids_checked; no check without a size)
  const inVocabulary = (encoded) => {
    const top = Number.isInteger(vocab) ? encoded.ids.reduce((a, b) => Math.max(a, b), -1) : -1;  // no spread: a long text
    if (top >= vocab) {
      const token = json.added_tokens?.find((a) => a.id === top)?.content ?? tokenizer.model.vocab[top];
      throw new EdgePeftError(`${loader.where("base/tokenizer.json")}: gives ${described(token)} the id ${top}, past ` +
        `the model's ${vocab} embeddings (a token added to the tokenizer, not to the model); resize the model's ` +
        "embeddings to the tokenizer (resize_token_embeddings), train and export again, or remove the token from the tokenizer");
    }
    return encoded;
  };
  return tokenizer;
}

/** A text pair's tokens and types as the Rust library gives them, where this library gave otherwise: without a post-processor, or
 * with ByteLevel's, the second text's tokens follow the first's, of type 1 (ByteLevel's dropped them, the other gave
 * no types); RobertaProcessing's are all of type 0 (it gave the second text's 1). */
function asRustPairs(tokenizer) {
  const run = (processor, [a, b], special) => {  // each text's [tokens, types] until a template joins them, as Rust's
    const type = processor?.config?.type;
    if (type === "Sequence") return processor.processors.reduce((parts, p) => run(p, parts, special), [a, b]);
    if (!processor || type === "ByteLevel") return [a, b];
    const { tokens, token_type_ids: types } = processor(a[0], b && b[0], special);
    return [[tokens, type === "RobertaProcessing" ? tokens.map(() => 0) : types], null];
  };
  tokenizer.tokenize_helper = (text, { text_pair = null, add_special_tokens = true } = {}) => {
    const encoded = (t, type) => { const tokens = tokenizer.encode_text(t); return [tokens, tokens.map(() => type)]; };
    const parts = run(tokenizer.post_processor, [encoded(text, 0), text_pair === null ? null : encoded(text_pair, 1)],
      add_special_tokens).filter(Boolean);
    return { tokens: parts.flatMap(([tokens]) => tokens), token_type_ids: parts.flatMap(([, types]) => types) };
  };
}

/** `text`, refused where it holds half of a character (a lone surrogate: a string cut inside an emoji), as the Python
 * runtime refuses it; this library encoded it as U+FFFD, or dropped it (BERT). */
function wholeCharacters(text) {
  if (/[\uD800-\uDFFF]/u.test(text)) {  // with the u flag, a surrogate pair is one character and does not match
    throw new EdgePeftError(`text ${JSON.stringify(text.slice(0, 40))} holds half of a character (a lone surrogate); ` +
      "pass whole characters");
  }
  return text;
}

/** Where the library's model reads otherwise than the Rust one, mended: unknown pieces are fused within a word (the
 * library fused them across a text's words: "Ω Ω" was one [UNK]; every Unigram model fuses); a WordLevel model's
 * unknown word is its own unk_token (the library took tokenizer_config.json's, and gave null where that names none);
 * and an added token that is normalized decodes as its normalized text ("COVID" added to an uncased model decodes as
 * "covid"), a special one too: the Rust library skips ids whose text is a special token's, so a normalized special
 * token that its normalizer changes ("[URL]" -> "[url]") is kept (the library skipped it, or gave "[URL]"). */
function asRustReads(tokenizer, json) {
  const { model, normalizer } = tokenizer;
  if (json.model?.type === "WordLevel") model.unk_token_id = model.tokens_to_ids.get(model.unk_token = json.model.unk_token);
  if (model.fuse_unk) {
    const call = model._call.bind(model);
    model._call = (words) => words.flatMap((word) => call([word]));
  }
  for (const token of tokenizer.added_tokens) {
    if (token.normalized && normalizer) model.vocab[token.id] = token.content = normalizer(token.content);
  }
}

// the Rust library's char::is_ascii_punctuation or a Unicode punctuation class: what its Punctuation pre-tokenizer splits
const PUNCTUATION = /[\p{P}!-\/:-@[-`{-~]/gu;

/** Split and Punctuation pre-tokenizers as the Rust library splits: each match (each punctuation character) kept apart,
 * dropped, merged with the piece before or after it, or joined to the matches beside it, as its behavior says, and
 * Split's invert taking the text between matches as the delimiters. The library split every behavior as "isolated"
 * (Punctuation as "contiguous") and, inverted, dropped the text between matches: other ids, with no word. A Metaspace
 * that splits (Rust's default) cuts before each "▁": the library never cut ("▁▁▁▁return": other merges, other ids). */
function asRustSplits(pre, json) {  // json: the file's pre_tokenizer (this library's Metaspace keeps no config)
  (pre?.tokenizers ?? []).forEach((part, i) => asRustSplits(part, json?.pretokenizers?.[i]));
  const type = json?.type;
  if (type === "Metaspace" && json.split !== false) {  // Rust's default: each "▁" starts a piece (MergedWithNext)
    const whole = pre.pre_tokenize_text.bind(pre), at = new RegExp(`(?=${pre.replacement.replace(/[\\^$.*+?()[\]{}|/]/g, "\\$&")})`, "u");
    pre.pre_tokenize_text = (text, options) => whole(text, options).flatMap((piece) => piece.split(at).filter(Boolean));
    return;
  }
  if ((type !== "Split" && type !== "Punctuation") || (type === "Split" && pre.pattern === null)) return;
  const pattern = type === "Punctuation" ? PUNCTUATION : pre.pattern;
  const behavior = (pre.config.behavior ?? "Isolated").toLowerCase(), invert = type === "Split" && pre.config.invert === true;
  if (type === "Split" && behavior === "isolated" && !invert) return;  // the library's own split is Rust's (and faster)
  pre.pre_tokenize_text = (text) => {
    const spans = [];  // [start, end, is a delimiter] over the whole text, as the Rust library's find_matches
    let at = 0;
    for (const m of text.matchAll(pattern)) {  // an empty match cuts the text too, as in Rust
      if (m.index > at) spans.push([at, m.index, invert]);
      spans.push([m.index, m.index + m[0].length, !invert]);
      at = m.index + m[0].length;
    }
    if (at < text.length) spans.push([at, text.length, invert]);
    const kept = [];
    if (behavior === "mergedwithnext") spans.reverse();
    spans.forEach(([start, end, delimiter], i) => {
      const last = kept.at(-1), previous = i > 0 && spans[i - 1][2];
      if (behavior === "removed" && delimiter) return;
      if (last && (behavior === "contiguous" ? delimiter === previous
        : behavior === "mergedwithprevious" || behavior === "mergedwithnext" ? delimiter && !previous : false)) {
        last[0] = Math.min(last[0], start); last[1] = Math.max(last[1], end);
      } else kept.push([start, end]);
    });
    if (behavior === "mergedwithnext") kept.reverse();  // walked from the end
    return kept.map(([start, end]) => text.slice(start, end)).filter(Boolean);
  };
}

const UTF8 = new TextEncoder();

/** Where the library's decoders read otherwise than the Rust ones, mended:
 * - ByteFallback read each byte run with a TextDecoder that drops a byte order mark (U+FEFF) at the run's start,
 *   which the Rust library keeps, and that keeps the valid bytes of a run that is not UTF-8, where the Rust one
 *   gives one U+FFFD a byte token ("<0x0A><0xDA>": "\uFFFD\uFFFD", not "\n\uFFFD");
 * - ByteLevel passed an added token's text through as it is, where the Rust one reads every token's characters
 *   through the byte map (the token's own UTF-8 where a character is not in it) and the bytes of all as one text:
 *   an added "café" decodes as "caf\uFFFD" there, as in the Python runtime;
 * - Metaspace dropped one space at the start of the first token, whatever its prepend_scheme, where the Rust one
 *   drops every "▁" of the first token unless the scheme is "never" (then each is a space, as in later tokens). */
function asRustDecodes(decoder) {
  for (const part of decoder?.decoders ?? []) asRustDecodes(part);
  if (decoder?.config?.type === "ByteFallback") {
    const strict = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
    decoder.text_decoder = { decode: (bytes) => {
      try {
        return strict.decode(bytes);
      } catch {
        return "\uFFFD".repeat(bytes.length);
      }
    } };
  }
  if (decoder?.config?.type === "ByteLevel" && decoder.byte_decoder) {
    const map = decoder.byte_decoder;
    decoder.decode_chain = (tokens) => [decoder.text_decoder.decode(Uint8Array.from(tokens.flatMap((t) => {
      const chars = [...t];
      return chars.every((c) => map[c] !== undefined) ? chars.map((c) => Number(map[c])) : [...UTF8.encode(t)];
    })))];
  }
  if (decoder?.config?.type === "Metaspace") {
    const { replacement } = decoder, config = decoder.config;
    const scheme = config.prepend_scheme ?? (config.add_prefix_space === false ? "never" : "always");
    decoder.decode_chain = (tokens) => tokens.map((t, i) => t.replaceAll(replacement, i === 0 && scheme !== "never" ? "" : " "));
  }
}
