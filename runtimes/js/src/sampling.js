// Token selection for generate: transformers' logits processing as the Python runtime does it
// (runtimes/generation.py), one row's last-position logits at a time.
//
//   logits --repetition penalty (not over the row's left padding)--> --no repeated n-grams (the whole row)-->
//          --eos held back (minNewTokens, minLength)--> greedy: the first largest score
//                                                     | sampling: --temperature--> --top-k--> --top-p--> --min-p-->
//                                                                 softmax --> one draw from a seeded generator
//
// Settings a call leaves unset (null or absent) come from the model's generation_config.json (the manifest's
// "generation"), else transformers' defaults, as in Python. The draws are this runtime's own: a seed repeats
// them here, not Python's (numpy's) stream. classify (below) scores a classifier's logits row as transformers'
// text-classification pipeline does.

import { EdgePeftError, checkLabels, described, fromBigint } from "./checks.js";

export const DEFAULT_NEW_TOKENS = 32;
// option -> the manifest's (generation_config.json's) name, and transformers' default
const SETTINGS = {
  maxNewTokens: ["max_new_tokens", null], maxLength: ["max_length", null], minNewTokens: ["min_new_tokens", null],
  minLength: ["min_length", null], doSample: ["do_sample", false], temperature: ["temperature", 1.0],
  topK: ["top_k", 50], topP: ["top_p", 1.0], minP: ["min_p", null], repetitionPenalty: ["repetition_penalty", 1.0],
  noRepeatNgramSize: ["no_repeat_ngram_size", 0], seed: ["seed", null], padTokenId: [null, null],
};
export const GENERATION_OPTIONS = Object.keys(SETTINGS);

const whole = (v) => Number.isInteger(v);
const real = (v) => typeof v === "number" && Number.isFinite(v);

/** The call's settings completed from the model's and transformers' defaults, checked as Python checks them. */
export function generationSettings(manifest, options) {
  const model = manifest.generation || {};
  const s = {};
  for (const [key, [name, fallback]] of Object.entries(SETTINGS)) {
    s[key] = fromBigint(options[key]) ?? (name && model[name] != null ? model[name] : fallback);  // 3n: int64's 3, as ids
  }
  s.modelLength = options.maxLength == null && options.maxNewTokens == null;  // a maxLength then: the model's
  for (const key of ["maxNewTokens", "maxLength"]) {
    if (s[key] != null && !(whole(s[key]) && s[key] >= 1)) throw new EdgePeftError(`${key} must be a positive integer, got ${described(s[key])}`);
  }
  for (const key of ["minNewTokens", "minLength", "noRepeatNgramSize"]) {
    if (s[key] != null && !(whole(s[key]) && s[key] >= 0)) throw new EdgePeftError(`${key} must be an integer >= 0, got ${described(s[key])}`);
  }
  if (!whole(s.topK)) throw new EdgePeftError(`topK must be an integer, got ${described(s.topK)}`);
  if (typeof s.doSample !== "boolean") throw new EdgePeftError(`doSample must be true or false, got ${described(s.doSample)}`);
  for (const key of ["temperature", "topP", "repetitionPenalty", ...(s.minP == null ? [] : ["minP"])]) {
    if (!real(s[key])) throw new EdgePeftError(`${key} must be a finite number, got ${described(s[key])}`);
  }
  if (s.doSample) {  // greedy decoding ignores the sampling values, as transformers does
    if (!(s.temperature > 0)) throw new EdgePeftError(`temperature must be > 0 when sampling, got ${described(s.temperature)} (greedy decoding: doSample false)`);
    if (s.topK < 0) throw new EdgePeftError(`topK must be >= 0 (0: off), got ${described(s.topK)}`);
    if (!(s.topP >= 0 && s.topP <= 1)) throw new EdgePeftError(`topP must be in [0, 1], got ${described(s.topP)}`);
    if (s.minP != null && !(s.minP >= 0 && s.minP <= 1)) throw new EdgePeftError(`minP must be in [0, 1], got ${described(s.minP)}`);
  }
  if (!(s.repetitionPenalty > 0)) throw new EdgePeftError(`repetitionPenalty must be > 0, got ${described(s.repetitionPenalty)}`);
  const { eos_token_id: eos, pad_token_id: pad } = model;  // a generation_config.json's, apart from config.json's
  if (eos !== undefined && !(Array.isArray(eos) ? eos : [eos]).every(whole)) {  // null too: as Python refuses it
    throw new EdgePeftError(`eos_token_id must be token ids, got ${described(eos).slice(0, 60)}`);
  }
  if (pad !== undefined && !(whole(pad) && pad >= 0 && pad < manifest.vocab_size)) {
    throw new EdgePeftError(`pad_token_id must be a token id in [0, ${manifest.vocab_size}), got ${described(pad).slice(0, 40)}`);
  }
  const call = s.padTokenId;  // the call's: finished rows' padding, and without a mask the left padding's
  if (call != null && !(whole(call) && call >= 0 && call < manifest.vocab_size)) {
    throw new EdgePeftError(`padTokenId must be a token id in [0, ${manifest.vocab_size}), got ${described(call).slice(0, 40)}`);
  }
  [s.modelEos, s.padTokenId, s.callPad] = [eos, call ?? pad, call];  // eos: generate's where the call gives none
  if (s.seed != null && !(Number.isSafeInteger(s.seed) && s.seed >= 0)) {  // past 2**53 a number holds no whole seed
    throw new EdgePeftError(`seed must be an integer in 0..${Number.MAX_SAFE_INTEGER}, got ${described(s.seed)}`);
  }
  return s;
}

/** The settings for a prompt `length` tokens wide, as transformers sets the lengths (Python's for_prompt): neither
 * length set, 32 new tokens at most the `room` the model's positions leave (at least 1; null: no limit); the model's
 * maxLength (not the call's) at most that room too: Llama-2's is its context, which a prompt adapter's tokens pass. */
export function forPrompt(s, length, room = null) {
  const out = { ...s };
  if (s.minNewTokens != null) out.minLength = s.minNewTokens + length;  // min_new_tokens wins over min_length
  if (out.maxNewTokens == null && s.maxLength == null) {
    out.maxNewTokens = room === null ? DEFAULT_NEW_TOKENS : Math.min(DEFAULT_NEW_TOKENS, Math.max(1, room));
  } else if (out.maxNewTokens == null) {
    if (s.maxLength <= length) {
      throw new EdgePeftError(`maxLength ${s.maxLength} (the call's, else the model's generation_config.json) leaves no new token after a ${length}-token prompt; pass maxNewTokens`);
    }
    out.maxNewTokens = s.modelLength && room !== null ? Math.max(1, Math.min(s.maxLength - length, room))
      : s.maxLength - length;
    if (!s.modelLength) out.fromLength = s.maxLength;  // the call's: a refusal names it (Runtime.checkLength)
  }
  return out;
}

/** A seeded uniform generator in [0, 1) (mulberry32); no seed: a random one. */
export function generator(seed) {
  const s = seed ?? Math.floor(Math.random() * 2 ** 32);
  let state = ((s >>> 0) ^ Math.imul(Math.floor(s / 2 ** 32), 0x9e3779b1)) >>> 0;  // seeds 2**32 apart: other draws
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

const f32 = Math.fround;

/**
 * The scores a row's next token is chosen from (Float32Array, -Infinity where removed): `row` the row so far
 * (prompt with its left padding, then the new tokens), `padding` its left-padding length, `promptLength` the
 * prompt's width, `eos` the end-of-sequence ids. Greedy: up to the eos hold-back; sampling: all of it. Greedy with
 * nothing to apply gets `logits` itself (read only): a copy of the vocabulary per row and token is not needed.
 */
export function processScores(logits, row, s, padding, promptLength, eos) {
  const holdEos = row.length - promptLength < (s.minNewTokens ?? 0) || row.length < (s.minLength ?? 0);
  if (!s.doSample && s.repetitionPenalty === 1 && !(s.noRepeatNgramSize > 0) && !holdEos) return logits;  // greedy: as is
  const scores = Float32Array.from(logits);
  const vocab = scores.length;
  if (s.repetitionPenalty !== 1) {  // in float32, as numpy and transformers multiply and divide
    const p = f32(s.repetitionPenalty);
    for (const t of new Set(row.slice(padding))) if (t < vocab) scores[t] = scores[t] < 0 ? f32(scores[t] * p) : f32(scores[t] / p);
  }
  const n = s.noRepeatNgramSize;
  if (n > 0 && row.length >= n) {  // tokens that would complete an n-gram the row holds already
    const tail = row.slice(row.length - n + 1);
    for (let i = 0; i + n <= row.length; i++) {
      if (tail.every((t, j) => row[i + j] === t)) scores[row[i + n - 1]] = -Infinity;
    }
  }
  if (holdEos) {
    for (const e of eos) if (e < vocab) scores[e] = -Infinity;
  }
  if (!s.doSample) return scores;
  const t = f32(s.temperature);
  for (let v = 0; v < vocab; v++) scores[v] = f32(scores[v] / t);
  if (s.topK > 0 && s.topK < vocab) {
    const kth = kthLargest(Float32Array.from(scores), s.topK);
    for (let v = 0; v < vocab; v++) if (scores[v] < kth) scores[v] = -Infinity;
  }
  if (s.topP < 1) {  // the smallest set of likeliest tokens reaching topP (ascending order, stable, as numpy sorts)
    // removed tokens (-Infinity) add nothing to the sum: only the others are sorted (after top-k, a few)
    const order = [...scores.keys()].filter((v) => scores[v] > -Infinity).sort((a, b) => scores[a] - scores[b] || a - b);
    const probs = softmax(order.map((v) => scores[v])).map(f32);  // float32, as numpy's over float32 scores
    let cumulative = 0;  // summed in double, each sum rounded to float32, as torch sums float32 (a float32 sum drifts)
    for (let i = 0; i < order.length - 1; i++) {
      cumulative += probs[i];
      if (f32(cumulative) <= f32(1 - s.topP)) scores[order[i]] = -Infinity;
    }
  }
  if (s.minP) {
    const probs = softmax(scores).map(f32);
    let top = 0;
    for (const p of probs) if (p > top) top = p;  // a loop: Math.max(...probs) overflows the stack at 128k tokens
    for (let v = 0; v < vocab; v++) if (probs[v] < f32(s.minP * top)) scores[v] = -Infinity;
  }
  return scores;
}

/** The k-th largest value (quickselect, in place: `a` is a scratch copy), as numpy's partition finds it. */
function kthLargest(a, k) {
  let lo = 0, hi = a.length - 1;
  const want = a.length - k;  // its index in ascending order
  while (lo < hi) {
    const pivot = a[(lo + hi) >> 1];
    let i = lo, j = hi;
    while (i <= j) {
      while (a[i] < pivot) i++;
      while (a[j] > pivot) j--;
      if (i <= j) { [a[i], a[j]] = [a[j], a[i]]; i++; j--; }
    }
    if (want <= j) hi = j; else if (want >= i) lo = i; else break;
  }
  return a[want];
}

function softmax(scores) {
  let max = -Infinity;
  for (const x of scores) if (x > max) max = x;
  const e = Array.from(scores, (x) => Math.exp(x - max));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / sum);
}

/** The row's next token from its processed scores: the first largest (greedy) or one draw of `random`. */
export function pick(scores, s, random) {
  if (!s.doSample) {
    let best = 0;
    for (let v = 1; v < scores.length; v++) if (scores[v] > scores[best]) best = v;
    return best;
  }
  const probs = softmax(scores);
  if (!probs.every(Number.isFinite)) {
    const far = s.repetitionPenalty !== 1;  // it divides or multiplies scores too (1e-40, 1e40: infinities), as in Python
    throw new EdgePeftError(`cannot sample: the scores are not finite (NaN or infinite logits, or temperature ${s.temperature} too small for float32${far ? `, or repetitionPenalty ${s.repetitionPenalty} too far from 1` : ""}); raise the temperature${far ? ", bring repetitionPenalty nearer to 1," : ""} or use greedy decoding`);
  }
  const u = random();
  let cumulative = 0, last = 0;
  for (let v = 0; v < probs.length; v++) {
    if (probs[v] > 0) last = v;
    cumulative += probs[v];
    if (cumulative > u) return v;
  }
  return last;  // rounding left the sum just under u: never a removed token
}

// float32 or float64 values (float16's data is its bits, a Uint16Array; int64's bigints)
const floats = (logits) => /^Float(32|64)Array$/.test(logits?.data?.constructor?.name);

/**
 * Label scores from a classifier's logits row: [{label, score}], highest first. As transformers' text-classification
 * pipeline (and the Python runtime's classify) by the model's problemType (rt.problemType): probabilities (softmax),
 * a sigmoid per label for "multi_label_classification" and for heads of one output, the logits for "regression".
 * Label names that do not fit the head (a hand-edited manifest) are an EdgePeftError naming the manifest.
 */
export function classify(logits, labels, row = 0, problemType = null) {
  if (logits?.dims?.length !== 2 || !(Number.isInteger(row) && row >= 0 && row < logits.dims[0]) || !floats(logits)) {
    throw new EdgePeftError(`classify takes a classifier's logits (a float tensor, batch x labels) and one of their rows; got ` +
      `${logits?.dims ? `${logits.type ?? ""} [${logits.dims}]` : described(logits)} and row ${described(row)}`);
  }
  if (!(problemType == null || typeof problemType === "string")) {  // another name: softmax, as transformers' pipeline
    throw new EdgePeftError("classify's problemType must be the model's (rt.problemType): null or a name such as " +
      `"multi_label_classification", got ${described(problemType)}`);
  }
  if (labels != null && !(Array.isArray(labels) && labels.every((l) => typeof l === "string"))) {  // "abc": a, b, c
    throw new EdgePeftError(`classify's labels must be an array of names (rt.labels(adapter)) or null, got ${described(labels)}`);
  }
  const width = logits.dims[1];
  checkLabels(labels, width);
  const values = Array.from(logits.data.slice(row * width, (row + 1) * width));
  let scores = values;
  if (problemType === "multi_label_classification" || (problemType !== "regression" && width === 1)) {
    scores = values.map((v) => 1 / (1 + Math.exp(-v)));
  } else if (problemType !== "regression") {
    const top = values.reduce((a, b) => Math.max(a, b), -Infinity);
    const exp = values.map((v) => Math.exp(v - top));
    const sum = exp.reduce((a, b) => a + b, 0);
    scores = exp.map((e) => e / sum);
  }
  return scores.map((score, i) => ({ label: labels ? labels[i] : String(i), score })).sort((a, b) => b.score - a.score);
}
