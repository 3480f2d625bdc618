// What the runtime refuses, and how it says so: an export's manifests and slot table, a call's options, an adapter's
// tensors and label names (a call's ids, mask and token types: inputs.js). The Python runtime's checks (manifest.py,
// slot_checks.py, text.py), in JavaScript's terms: a damaged, hand-edited or hostile export is an EdgePeftError naming
// the file and a fix, never a TypeError, a raw ONNX Runtime error, a file outside the export or a silent wrong answer.

import { baseValueErrors } from "./base_checks.js";

export class EdgePeftError extends Error {}
/** A call's inputs need more memory than the device has (Python's OutOfMemoryError): the message says how much. */
export class OutOfMemoryError extends EdgePeftError {}
// an error's name as String(e) and consoles show it, kept through a bundler's renaming
EdgePeftError.prototype.name = "EdgePeftError";
OutOfMemoryError.prototype.name = "OutOfMemoryError";

export function described(v) {  // a value as a message shows it: "5", 5n, 2.5, [NaN, 1], Int32Array, {"a":1}
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v !== "object" || v === null) return String(v);
  if (Array.isArray(v)) return `[${v.slice(0, 20).map(described).join(",")}${v.length > 20 ? ",..." : ""}]`;  // NaN: not null
  if (!plain(v)) return v.constructor?.name ?? "an object";
  return JSON.stringify(v, (_, x) => (typeof x === "bigint" ? `${x}n` : x));  // a bigint inside threw a TypeError
}

/** An object literal's kind of object, of this realm or another's (Node's vm, another frame: refused as "Object"). */
export function plain(v) {
  if (typeof v !== "object" || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v);
  return proto === null || (Object.getPrototypeOf(proto) === null && Object.prototype.toString.call(v) === "[object Object]");
}

export const FORMAT_VERSION = 4;  // the newest export format this runtime reads: runtimes/manifest.py's (a test keeps them equal)
export const REEXPORT = "re-export it under its folder's name (edgepeft export --adapter DIR --out OUT --name NAME --overwrite)";
export const REEXPORT_BASE = "copy the export's base folder again, or re-run `edgepeft export` into a fresh --out folder";  // as Python's: a device's copy first
/** The fix for a damaged file of the export at `rel`: the base's needs a fresh export, an adapter's a re-export. */
export const reexportFor = (rel) => rel.startsWith("base/") ? REEXPORT_BASE : REEXPORT;
export const JSON_MOST = 16 * 2 ** 20;  // a manifest past it is refused unread, as the Python runtime's access.JSON_MOST
export const jsonMost = (rel) => rel.endsWith("tokenizer.json") ? Infinity : JSON_MOST;  // a vocabulary: MBs, read whole as in Python
/** An adapter's graph past `most` bytes, the most one of this base may take (every loader's words: refused unread). */
export const pastMost = (where, most) => new EdgePeftError(`${where}: more than an adapter of this base can take (${most} bytes); ${REEXPORT}`);
/** ONNX Runtime's (or another library's) error in one line of a readable length, as Python's first_line: a forged
 * graph's error named each of its 100,000 inputs (megabytes). */
export const firstLine = (e) => String(e?.message ?? e).split("\n")[0].slice(0, 300);
const MIN_ORT = [1, 22];  // as runtimes/sessions.py and package.json's peerDependencies: 1.20 and 1.21 refuse GroupQueryAttention

/** What to install where ONNX Runtime's module (onnxruntime-node or -web) is older than exports need, else "". */
export function olderRuntime(ort) {
  const versions = ort.env?.versions ?? {};
  const pkg = versions.web ? "onnxruntime-web" : "onnxruntime-node";
  const version = versions.web ?? versions.node ?? versions.common;
  const parts = String(version).split(".").map((p) => parseInt(p, 10));
  const i = MIN_ORT.findIndex((v, k) => parts[k] !== v);  // the first part that differs
  return i >= 0 && parts[i] < MIN_ORT[i]
    ? `edgepeft's exports need ${pkg}>=${MIN_ORT.join(".")}, this is ${version}: npm install ${pkg}@latest` : "";
}

const string = (v) => typeof v === "string";
const whole = Number.isInteger;
const object = (v) => typeof v === "object" && v !== null && !Array.isArray(v);
const strings = (v) => Array.isArray(v) && v.every(string);
const orNull = (is) => (v) => v === null || is(v);

/** A file's name in the folder of the manifest that names it: no path to elsewhere ("../x", "/etc/x", "."). */
export const bareName = (v) => string(v) && !/[/\\]/.test(v) && !["", ".", ".."].includes(v);

// Manifest fields that must have these types where present: runtimes/manifest.py's _FIELD_TYPES, and the graphs' names
const FIELD_TYPES = {
  model_type: [string, "a string"], task: [string, "a string"], inputs: [object, "an object"], outputs: [object, "an object"],
  vocab_size: [whole, "a whole number"], type_vocab_size: [orNull(whole), "a whole number"],
  max_positions: [orNull(whole), "a whole number"], cache: [orNull(object), "an object"],
  generation: [object, "an object"], merged_adapter: [orNull(string), "a name"], revision: [orNull(string), "a hub revision"],
  file_bytes: [(v) => object(v) && Object.values(v).every(whole), "an object of file sizes in bytes"],
  methods: [strings, "a list of method names"], labels: [orNull(strings), "a list of names"],
  parameter_bytes: [whole, "a whole number"], rank: [orNull(Number.isFinite), "a number"], alpha: [orNull(Number.isFinite), "a number"],
  problem_type: [orNull(string), "a string"], fingerprint_counts_heads: [(v) => typeof v === "boolean", "true or false"],
  name: [string, "a string"], fingerprint: [string, "a string"], base_fingerprint: [string, "a string"], sha256: [string, "a string"],
  graph: [bareName, "a file name in the same folder"], web_graph: [orNull(bareName), "a file name in the same folder"],
  neutral_graph: [orNull(bareName), "a file name in the same folder"], eos_token_id: [orNull(Array.isArray), "a list of token ids"],
  pad_token_id: [orNull(whole), "a token id"], ops: [string, "a string"], text_files: [(v) => strings(v) && v.every(bareName),
    "a list of file names in the same folder"], file_sha256: [(v) => object(v) && Object.values(v).every(string), "an object of SHA-256 digests"],
};
const REQUIRED = {
  "edgepeft-base": ["model_type", "task", "fingerprint", "inputs", "outputs", "slots", "vocab_size", "graph"],
  "edgepeft-adapter": ["name", "methods", "base_fingerprint", "slots", "graph", "sha256"],
};
const cacheName = (v) => string(v) && v.split("%").length === 2 && v.includes("%d");  // one layer index, nothing else
const CACHE_LAYOUT = { num_layers: whole, num_kv_heads: whole, head_dim: whole, past_key: cacheName, past_value: cacheName,
  present_key: cacheName, present_value: cacheName };

/**
 * A manifest of `form` ("edgepeft-base", "edgepeft-adapter") in a format this runtime reads, with the fields the runtime
 * reads of the types it reads them as (a base's slot table too), or EdgePeftError naming the file: a hand-edited field
 * was a TypeError deep in a call, a graph named "../x" a file outside the export.
 */
export function checkFormat(manifest, form, where) {
  const base = form === "edgepeft-base";
  const fix = base ? REEXPORT_BASE : REEXPORT;  // "re-run export" was refused in that OUT
  if (manifest?.format !== form) throw new EdgePeftError(`${where}: not an ${form} manifest; ${fix}`);
  const version = manifest.format_version;
  if (!Number.isInteger(version) || version < 1) {  // "3", -5: no version
    throw new EdgePeftError(`${where}: format version ${described(version)} is not a version (a whole number from 1); ${fix}`);
  }
  if (version > FORMAT_VERSION) {
    throw new EdgePeftError(`${where}: format version ${described(version)} is newer than this runtime reads (${FORMAT_VERSION}); ` +
      "update the JavaScript runtime (runtimes/js) to the edgepeft that exported it, or export with this runtime's edgepeft");
  }
  const refuse = (what) => { throw new EdgePeftError(`${where}: ${what}; ${fix}`); };
  const missing = REQUIRED[form].filter((key) => !(key in manifest));
  if (missing.length) refuse(`manifest lacks ${missing.join(", ")}`);
  for (const [key, [is, what]] of Object.entries(FIELD_TYPES)) {
    if (key in manifest && !is(manifest[key])) refuse(`field ${key} must be ${what}, got ${described(manifest[key]).slice(0, 60)}`);
  }
  const { cache, slots } = manifest;
  if (cache && !Object.entries(CACHE_LAYOUT).every(([key, is]) => is(cache[key]))) refuse("field cache lacks the cache layout (names with one %d)");
  if (!base) {
    if (!object(slots)) refuse("field slots must map slot names to shapes");
    return;
  }
  if (!Object.keys(manifest.outputs).length) refuse("field outputs names no output");
  if (manifest.task === "causal-lm" && !cache) refuse("a causal-lm base needs its cache table (cache)");
  const [wrong] = baseValueErrors(manifest);
  if (wrong) refuse(wrong);
  if (!Array.isArray(slots)) refuse("field slots must be a list of slots");
  checkSlotTable(slots, cache, where);
  // an encoder's prefix before position_axis: the text at the prefix's positions, not after them (as Python refuses)
  const older = slots.find((s) => s.method === "prefix" && !s.target && s.position_axis == null);
  if (older) {
    throw new EdgePeftError(`${where}: was written by an older edgepeft (its slot ${older.name} puts the text at the ` +
      "prefix's positions, where HF PEFT puts it after them); export every adapter into a fresh --out folder");
  }
}

const DTYPES = ["float32", "float16", "int64", "int32", "bool"];
const NEUTRALS = ["empty", "base", "ones", "zeros"];
const PHASES = ["every", "prefill"];
const SELECTS = ["", "columns", "adapters"];

/** The base's slot table as runtimes/slot_checks.py checks it: the fields the runtime indexes shapes by and binds by. */
function checkSlotTable(slots, cache, where) {
  const past = new Set(cache ? cacheNames(cache, "past") : []);
  const selectors = new Map(slots.filter((s) => s?.selects).map((s) => [s.name, s.selects]));
  const seen = new Set(), twice = new Set();
  for (const name of slots.map((s) => s?.name)) (seen.has(name) ? twice : seen).add(name);
  slots.forEach((slot, i) => {
    const wrong = slotErrors(slot, twice, past, selectors);
    if (wrong.length) {
      throw new EdgePeftError(`${where}: malformed slot ${string(slot?.name) ? slot.name : `at ${i}`} (${wrong[0]}); ${REEXPORT_BASE}`);
    }
  });
  checkSharedPhases(slots, where);
}

/** What is wrong with one slot of the table; a field absent reads as the Python runtime's default. */
function slotErrors(slot, twice, past, selectors) {
  if (!object(slot)) return ["not an object"];
  const field = (key, absent) => (key in slot ? slot[key] : absent);
  const { name, method, role, module, neutral, dtype, shape } = slot;
  const named = [name, method, role, module, neutral, field("phase", ""), field("target", ""), field("selector", ""),
    field("selects", "")];
  if (!named.every(string) || !DTYPES.includes(dtype) || !Array.isArray(shape) || !shape.every((n) => whole(n) || string(n))) {
    return [`names are strings, dtype one of ${DTYPES.join(", ")}, shape sizes or axis names`];
  }
  const wrong = [];
  if (twice.has(name)) wrong.push("its name is listed twice");
  if (!NEUTRALS.includes(neutral)) wrong.push(`neutral must be one of ${NEUTRALS.join(", ")}`);
  if (!PHASES.includes(field("phase", "every"))) wrong.push(`phase must be one of ${PHASES.join(", ")}`);
  if (shape.some((n) => whole(n) && n < 0)) wrong.push("its shape's sizes must be 0 or more");
  for (const key of ["virtual_axis", "position_axis", "stack_axis"]) {
    const axis = field(key, null);
    if (axis !== null && !(whole(axis) && axis >= 0 && axis < shape.length)) {
      wrong.push(`${key} must be an axis of its shape (0 to ${shape.length - 1})`);
    } else if (key === "virtual_axis" && axis !== null && !string(shape[axis])) {
      wrong.push("virtual_axis must be a named axis (an adapter's count of virtual tokens)");
    }
  }
  const target = field("target", "");
  if (target && !past.has(target)) wrong.push("target must name a cache input (past_key_values.*)");
  if (!SELECTS.includes(field("selects", ""))) wrong.push("selects must be columns or adapters");
  const selector = field("selector", "");
  if (selector && selector !== "output" && !selectors.has(selector)) {
    wrong.push("selector must name a selector slot (one with selects) or be output");
  }
  if (!strings(field("members", []))) wrong.push("members must be module names");
  if ((field("stack_axis", null) === null) !== !selector) {
    wrong.push("stack_axis and selector come together (a slot that stacks is selected per row)");
  }
  if (selectors.get(selector) === "adapters" && !["ones", "zeros"].includes(neutral)) wrong.push("a slot whose selector selects adapters is neutral ones or zeros (a row without the adapter reads that value in a mixed batch)");
  const virtualAxis = field("virtual_axis", null);
  if ((virtualAxis !== null || target) && field("phase", "every") !== "prefill") {
    wrong.push("virtual tokens (virtual_axis, target) are bound at prefill only (phase prefill)");
  }
  if (field("phase", "every") === "prefill" && virtualAxis === null) {
    wrong.push("a slot bound at prefill adds virtual tokens and counts them (virtual_axis)");
  }
  return wrong;
}

/** Slots that share a symbolic axis are bound together (a LoRA pair, a prefix's layers): one phase for them all. */
function checkSharedPhases(slots, where) {
  const first = {};
  for (const slot of slots) {
    for (const axis of slot.shape.filter(string)) {
      const other = (first[axis] ??= slot);
      const [phase, otherPhase] = [slot.phase ?? "every", other.phase ?? "every"];
      if (phase !== otherPhase) {
        throw new EdgePeftError(`${where}: malformed slot ${slot.name} (phase ${phase} differs from ${other.name}'s, which ` +
          `shares its axis ${axis}); ${REEXPORT_BASE}`);
      }
    }
  }
}

/** The cache's input ("past") or output ("present") names: layer 0 key, layer 0 value, layer 1 key, ... */
export function cacheNames(cache, direction) {
  const out = [];
  for (let layer = 0; layer < cache.num_layers; layer++) {
    out.push(cache[`${direction}_key`].replace("%d", layer), cache[`${direction}_value`].replace("%d", layer));
  }
  return out;
}

const camel = (key) => key.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const snake = (key) => key.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

// the tokenizer's options that are switches (the library takes any value, truthy or not; undefined is the default),
// and those whose null is the library's default too (the others' null overrode a default of true)
const FLAGS = ["add_special_tokens", "return_token_type_ids", "skip_special_tokens", "clean_up_tokenization_spaces"];
const NULLABLE = ["return_token_type_ids", "clean_up_tokenization_spaces"];

/**
 * A call's options object, or EdgePeftError: a key the call does not know would otherwise be dropped
 * in silence (`{max_new_tokens: 3}` generating 32 tokens, `{adaptor: "x"}` running the base model).
 */
export function checkOptions(options, allowed, call, elsewhere = "") {
  if (options == null) return {};
  if (!plain(options)) {
    throw new EdgePeftError(`${call}'s options must be an object such as { ${allowed[0]}: ... }; got ${described(options)}`);
  }
  const unknown = Object.keys(options).filter((k) => !allowed.includes(k));
  if (unknown.length) {  // the runtime's calls name options in camelCase, the tokenizer's in snake_case (the library's)
    const meant = (spell) => unknown.map(spell).filter((k) => allowed.includes(k)).join(", ");
    const hint = meant(camel) ? ` (${meant(camel)}: camelCase here)` : meant(snake) ? ` (${meant(snake)}: snake_case here)` : "";
    throw new EdgePeftError(`${call} has no option ${unknown.join(", ")}; its options are ${allowed.join(", ")}${hint}` +
      elsewhere);
  }
  for (const [key, value] of Object.entries(options)) {  // a flag's "false" (a string) counted as true
    if (FLAGS.includes(key) && typeof value !== "boolean" && value !== undefined && !(value === null && NULLABLE.includes(key))) {
      throw new EdgePeftError(`${call}'s ${key} must be true or false, got ${described(value)}`);
    }
  }
  return options;
}

/** Runtime.open's sessionOptions: null (or none) is ONNX Runtime's defaults (Python's None also stops spinning); a value
 * that is not an object is refused as such (null was a TypeError; 5 or true blamed the export's files). */
export function sessionOptionsOf(v) {
  if (v == null) return {};
  if (!plain(v)) {
    throw new EdgePeftError("Runtime.open's sessionOptions must be an object of ONNX Runtime's session options, such as " +
      `{ executionProviders: ["cpu"] }, or null for its defaults; got ${described(v)}`);
  }
  return v;
}

/** A bigint of int64's range as a number (past 2**53 not exact, but then no token id: the checks name it as such). */
export const fromBigint = (v) => (typeof v === "bigint" && BigInt.asIntN(64, v) === v ? Number(v) : v);

/**
 * An adapter's tensors against the base's slot table, as the Python runtime checks them (runtimes/slot_checks.py):
 * each a slot of this base that is not a selector (the runtime binds those per call: filled with zeros, the adapter
 * was a no-op), of the slot's dtype and sizes, one adapter along the axis that stacks adapters (IA3's), and every slot
 * that shares a symbolic axis filled too (the graph multiplies them: LoRA A without its B crashed in ONNX Runtime).
 */
export function checkTensors(tensors, manifest, slots, sharing, where) {
  const axes = {};
  for (const [name, tensor] of Object.entries(tensors)) {
    const slot = Object.hasOwn(slots, name) ? slots[name] : undefined;  // "constructor" is no slot
    if (!slot) throw new EdgePeftError(`${where}: fills slot ${name}, which this base lacks; export the adapter into this OUT`);
    if (slot.selects) throw new EdgePeftError(`${where}: fills the selector slot ${name}, which the runtime binds per call; ${REEXPORT}`);
    const shape = `${tensor.type}[${tensor.dims}]`;
    if (tensor.type !== slot.dtype || tensor.dims.length !== slot.shape.length) {
      throw new EdgePeftError(`${where}: slot ${name} is ${shape}, the base expects ${slot.dtype}[${slot.shape}]; ${REEXPORT}`);
    }
    if (/^float(32|64)$/.test(tensor.type) && !tensor.data.every(Number.isFinite)) {  // NaN logits: a NaN score
      throw new EdgePeftError(`${where}: slot ${name} holds values that are not finite (NaN or infinity), which no export writes; ${REEXPORT}`);
    }
    const stacked = adaptersAxis(slot, slots);
    slot.shape.forEach((want, i) => {
      const size = tensor.dims[i];
      if (size === 0 && want === `head_out.${slot.module}`) {  // a head of no classes
        throw new EdgePeftError(`${where}: slot ${name} is a head of no outputs; ${REEXPORT}`);
      }
      if (want === stacked && size !== 1) {
        throw new EdgePeftError(`${where}: slot ${name} stacks ${size} adapters along ${want}; an adapter gives 1; ${REEXPORT}`);
      }
      if (typeof want === "string" ? (axes[want] ??= size) !== size : size !== want) {
        throw new EdgePeftError(`${where}: slot ${name} is ${shape}, the base expects ${slot.dtype}[${slot.shape}]; ${REEXPORT}`);
      }
    });
  }
  for (const name of Object.keys(tensors)) {
    const slot = slots[name];
    for (const axis of slot.shape.filter((a) => string(a) && a !== adaptersAxis(slot, slots))) {
      const unfilled = sharing[axis].filter((n) => !Object.hasOwn(tensors, n));
      if (unfilled.length) {
        throw new EdgePeftError(`${where}: fills ${name} but not ${unfilled.sort()[0]}, which shares its axis ${axis}; ${REEXPORT}`);
      }
    }
  }
  const listed = Object.keys(manifest.slots);
  if (listed.length !== Object.keys(tensors).length || !listed.every((n) => Object.hasOwn(tensors, n))) {
    throw new EdgePeftError(`${where}: adapter.json and adapter.onnx disagree on the slots; ${REEXPORT}`);
  }
}

/** {symbolic axis: names of the slots whose shape has it} (selector slots left out): made once per base (per tensor,
 * 1,121 slots took 320 ms a load). */
export function axisSharing(slots) {
  const sharing = {};
  for (const s of Object.values(slots)) {
    for (const axis of s.selects ? [] : new Set(s.shape.filter(string))) (sharing[axis] ??= []).push(s.name);
  }
  return sharing;
}

/** The axis along which a slot stacks whole adapters (IA3's: one entry per adapter), else null. */
function adaptersAxis(slot, slots) {
  const selector = slots[slot.selector];
  return slot.stack_axis == null || selector?.selects !== "adapters" ? null : slot.shape[slot.stack_axis];
}

/** Label names as a manifest gives them (or null), carrying `where`: classify names that file when they do not fit the head. */
export function namedLabels(labels, where) {
  return labels ? Object.defineProperty([...labels], "where", { value: where }) : null;
}

/** Label names (or null) that fit a head of `width` outputs, or EdgePeftError naming the manifest that gave them. */
export function checkLabels(labels, width) {
  if (labels && labels.length !== width) {
    throw new EdgePeftError(`${labels.where ?? "the labels given"}: gives ${labels.length} label name(s), the head has ${width} ` +
      `outputs; ${labels.where ? "re-export with --overwrite" : "give one name per output"}`);
  }
}

// Where ONNX Runtime looks for an adapter graph's external data: a folder that does not exist. A graph made from bytes
// had it resolved against the process's working directory (a hostile adapter.onnx read a file of the app's folder);
// exports never write external data for adapters, so ONNX Runtime now refuses any ("External data path does not exist").
const NO_FOLDER = "/edgepeft: adapter graphs hold their tensors inside";

/** Session options for an adapter graph: the caller's, with external data read from nowhere. */
export function adapterSessionOptions(options) {
  const extra = options.extra ?? {};
  return { ...options, extra: { ...extra, session: { ...extra.session, model_external_initializers_file_folder_path: NO_FOLDER } } };
}

export const OPTIONAL = Symbol("optional");  // readJson's missing: a file that may be absent reads as {}

/**
 * A file of the export as JSON; one that is missing or damaged is an EdgePeftError naming it and a fix.
 * missing: what to say when the file is not there (null: the loader's own advice, for OUT itself; OPTIONAL: {}).
 */
export async function readJson(loader, rel, missing = `missing from the export; ${REEXPORT}`, fix = REEXPORT) {
  try {
    return await loader.json(rel);
  } catch (e) {
    if (e.missing && missing === OPTIONAL) return {};
    if (e instanceof EdgePeftError && !(e.missing && missing)) throw e;
    throw new EdgePeftError(`${loader.where(rel)}: ${e.missing ? missing : `not readable JSON (${e.message}); ${fix}`}`);
  }
}

/**
 * The base's files against the sizes the export recorded (file_bytes), as the Python runtime checks them: a copy
 * cut short, or a stale one served over HTTP, is named as such (ONNX Runtime's own error named the graph, or an
 * initializer's offsets; a stale one of another length gave other logits), and a missing one.
 */
export async function checkSizes(loader, manifest, files) {
  for (const file of loader.size ? files : []) {
    const want = manifest.file_bytes?.[file];
    const got = want === undefined ? undefined : await loader.size(`base/${file}`, want);  // want: more need not be read
    if (want !== undefined && got === undefined) {  // on Node, ONNX Runtime reads model.onnx.data: it blamed the graph
      throw new EdgePeftError(`${loader.where(`base/${file}`)}: missing; ${REEXPORT_BASE}`);
    }
    if (got !== undefined && got !== want) {
      throw new EdgePeftError(`${loader.where(`base/${file}`)}: ${got === Infinity ? `more than ${want}` : got} bytes ` +
        `where the export wrote ${want} (a copy cut short?); ${REEXPORT_BASE}`);
    }
  }
}

/** Runtime.open's first two arguments, or EdgePeftError naming what to pass. */
export function checkOpenArguments(ort, loader) {
  if (typeof ort?.InferenceSession?.create !== "function") {
    throw new EdgePeftError("Runtime.open takes ONNX Runtime's module first (import * as ort from \"onnxruntime-node\" " +
      "or \"onnxruntime-web\")");
  }
  if (typeof loader?.where !== "function" || typeof loader?.json !== "function") {
    throw new EdgePeftError(`Runtime.open takes a loader of the export's files, got ${typeof loader === "string" ?
      JSON.stringify(loader) : String(loader)}; open a folder with openFolder (Node.js) or an address with openUrl`);
  }
}
