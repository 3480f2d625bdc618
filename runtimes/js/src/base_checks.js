// What a base manifest's values must be beyond their types, and what the graph must declare as the manifest says:
// runtimes/base_checks.py in JavaScript's terms. A hand-edited or damaged base/edgepeft.json is refused naming its
// field, where a value out of range filled the memory (a cache of 10**12 layers), was ONNX Runtime's error at the
// first call (a cache's widths, a vocabulary the logits do not have), or returned another output than the task's.
import { described } from "./checks.js";
import { generationSettings } from "./sampling.js";

const whole = Number.isInteger;
export const TOKEN_TYPES = "token_type_ids";  // a seq-cls BERT's input: its second segment (text pairs)
const TASK_OUTPUTS = { "causal-lm": "logits", "seq-cls": "logits", "feature-extraction": "last_hidden_state" };

/** runtimes/base_checks.py's base_value_errors: sizes from 1 (token types given where the graph takes them), eos ids
 * as 64-bit integers, the cache's layers as the manifest's inputs and outputs list them (a cache of 10**12 layers
 * filled the memory), the kernels' choice. */
export function baseValueErrors(m) {
  const errors = [];
  const vocab = m.vocab_size;
  if (vocab < 1) errors.push(`field vocab_size must be at least 1, got ${vocab}`);
  if (m.max_positions != null && m.max_positions < 1) errors.push(`field max_positions must be at least 1 (or null), got ${m.max_positions}`);
  const types = m.type_vocab_size;  // a seq-cls BERT's token types, which a call's tokenTypeIds are checked against
  if (types != null && types < 1) errors.push(`field type_vocab_size must be at least 1 (or null), got ${types}`);
  if (types == null && Object.hasOwn(m.inputs, TOKEN_TYPES)) {
    errors.push(`field inputs lists ${TOKEN_TYPES}; field type_vocab_size must give its token types`);
  }
  if (m.max_positions == null && m.ops === "contrib" && m.cache) {  // ONNX Runtime's RotaryEmbedding error at a call
    errors.push("field max_positions must be the length of a contrib decoder's position tables, got null");
  }
  const eos = m.eos_token_id ?? [];
  if (!eos.every((e) => whole(e) && Math.abs(e) < 2 ** 63)) errors.push(`field eos_token_id must list token ids (64-bit integers), got ${described(eos).slice(0, 60)}`);
  if (!["contrib", "standard"].includes(m.ops ?? "standard")) errors.push(`field ops must be contrib or standard, got ${described(m.ops).slice(0, 40)}`);
  try {  // generate's defaults, which a call leaves unset: "maxNewTokens must be ...", though the call gave none
    if (m.cache) generationSettings(m, {});
  } catch (e) {
    errors.push(`field generation: ${e.message} (the model's default)`);
  }
  // as Python refuses them: a null that generationSettings reads as unset, and stop strings (Python's alone to apply)
  const unset = ["do_sample", "temperature", "top_k", "top_p", "repetition_penalty"].find((k) => m.generation?.[k] === null);
  if (unset) errors.push(`field generation.${unset} must be a value (or left out), got null`);
  const stop = m.generation?.stop, stops = typeof stop === "string" ? [stop] : stop ?? [];
  if (!(Array.isArray(stops) && stops.every((t) => typeof t === "string" && t))) {
    errors.push(`field generation.stop must be a string or a list of non-empty strings, got ${described(stop).slice(0, 40)}`);
  }
  const output = TASK_OUTPUTS[m.task];  // the runtime returns the first output: the task's (runtimes/manifest.py)
  if (output && Object.keys(m.outputs)[0] !== output) errors.push(`field outputs must list ${output} first, a ${m.task} graph's`);
  const cache = m.cache;
  if (!cache) return errors;
  const small = ["num_layers", "num_kv_heads", "head_dim"].find((k) => cache[k] < 1);
  if (small) return [...errors, `field cache: ${small} must be at least 1, got ${cache[small]}`];
  for (const [direction, side] of [["past", "inputs"], ["present", "outputs"]]) {
    const patterns = ["key", "value"].map((part) => new RegExp(`^${cache[`${direction}_${part}`]
      .replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace("%d", "\\d+")}$`));
    const count = Object.keys(m[side]).filter((n) => patterns.some((p) => p.test(n))).length;
    if (count !== 2 * cache.num_layers) errors.push(`field cache: num_layers is ${cache.num_layers}, field ${side} lists ${count} ${direction} tensors (2 a layer)`);
  }
  return errors;
}

/** Where the opened graph and the manifest disagree on what the runtime sizes or binds by the manifest: the inputs and
 * outputs it lists, the cache's heads and widths, a decoder's vocabulary (its logits). */
export function graphDeclarationErrors(session, m) {
  for (const [side, names] of [["inputs", session.inputNames], ["outputs", session.outputNames]]) {
    const absent = Object.keys(m[side]).find((n) => !names.includes(n));
    if (absent) return [`field ${side} lists ${absent}, which the graph lacks`];
  }
  const slots = new Set((m.slots ?? []).map((s) => s.name));  // model.web.onnx requires the slots too
  const unlisted = session.inputNames.find((n) => !Object.hasOwn(m.inputs, n) && !slots.has(n));
  if (unlisted) return [`the graph takes ${unlisted}, which field inputs does not list`];  // ONNX Runtime's error per call
  const shape = (list, name) => (Array.isArray(list) ? list.find((x) => x.name === name)?.shape : null) ?? [];
  if (!m.cache) return [];
  const past = shape(session.inputMetadata, m.cache.past_key.replace("%d", 0));  // (batch, kv heads, positions, width)
  for (const [axis, key] of [[1, "num_kv_heads"], [3, "head_dim"]]) {
    if (past.length === 4 && whole(past[axis]) && past[axis] !== m.cache[key]) return [`field cache: ${key} is ${m.cache[key]}, the graph's is ${past[axis]}`];
  }
  const vocab = shape(session.outputMetadata, "logits").at(-1);
  return whole(vocab) && vocab !== m.vocab_size ? [`field vocab_size is ${m.vocab_size}, the graph's logits have ${vocab}`] : [];
}
