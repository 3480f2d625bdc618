// What the runtime refuses, and how it says so: a call's options, its ids and mask, an adapter's tensors.
// The Python runtime's checks (runtimes/inputs.py, runtimes/adapters.py), in JavaScript's terms.

export class EdgePeftError extends Error {}

function described(v) {  // a value as a message shows it: "5", 5n, 2.5, Int32Array, {"a":1}
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v !== "object" || v === null) return String(v);
  return [Object, Array].includes(v.constructor) ? JSON.stringify(v) : v.constructor?.name ?? "an object";
}

export const FORMAT_VERSION = 3;  // the newest export format this runtime reads: runtimes/manifest.py's (a test keeps them equal)

/** A manifest of `form` ("edgepeft-base", "edgepeft-adapter") in a format this runtime reads, or EdgePeftError. */
export function checkFormat(manifest, form, where) {
  if (manifest?.format !== form) throw new EdgePeftError(`${where}: not an ${form} manifest; re-run \`edgepeft export\``);
  const version = manifest.format_version;
  if (!Number.isInteger(version) || version > FORMAT_VERSION) {
    throw new EdgePeftError(`${where}: format version ${described(version)} is newer than this runtime reads (${FORMAT_VERSION}); ` +
      "update the JavaScript runtime (runtimes/js) to the edgepeft that exported it, or export with this runtime's edgepeft");
  }
}

const camel = (key) => key.replace(/_([a-z])/g, (_, c) => c.toUpperCase());

/**
 * A call's options object, or EdgePeftError: a key the call does not know would otherwise be dropped
 * in silence (`{max_new_tokens: 3}` generating 32 tokens, `{adaptor: "x"}` running the base model).
 */
export function checkOptions(options, allowed, call, elsewhere = "") {
  if (options == null) return {};
  if (typeof options !== "object" || Array.isArray(options) || ![Object.prototype, null].includes(Object.getPrototypeOf(options))) {
    throw new EdgePeftError(`${call}'s options must be an object such as { ${allowed[0]}: ... }; got ${described(options)}`);
  }
  const unknown = Object.keys(options).filter((k) => !allowed.includes(k));
  if (unknown.length) {
    const meant = unknown.map(camel).filter((k) => allowed.includes(k));
    throw new EdgePeftError(`${call} has no option ${unknown.join(", ")}; its options are ${allowed.join(", ")}` +
      (meant.length ? ` (${meant.join(", ")}: camelCase here)` : "") + elsewhere);
  }
  return options;
}

/** Rows of whole numbers from arrays or typed arrays of numbers or bigints (ONNX Runtime's int64 tensors give those). */
function integerRows(x, what) {
  const isRow = (r) => Array.isArray(r) || ArrayBuffer.isView(r);
  if (isRow(x) && x.length && !isRow(x[0])) x = [x];  // one row given flat
  if (!Array.isArray(x) || !x.length || !x.every(isRow)) {
    throw new EdgePeftError(`${what} must be a non-empty array of rows (2-D: batch x sequence), every row the same length (pad on the left)`);
  }
  return x.map((row) => Array.from(row, (v) => {
    if (isRow(v)) throw new EdgePeftError(`${what} must be rows of numbers (2-D: batch x sequence); got more levels of arrays`);
    if (typeof v === "bigint" && v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(v);
    if (typeof v === "boolean" && what === "mask") return Number(v);
    if (!Number.isInteger(v)) throw new EdgePeftError(`${what} must hold whole numbers; got ${described(v)}`);
    return v;
  }));
}

/** ids and mask as rows of numbers of equal length, or EdgePeftError saying what is wrong. */
export function checkInputs(ids, mask, manifest, where) {
  ids = integerRows(ids, "ids");
  if (!ids.every((r) => r.length === ids[0].length) || !ids[0].length) {
    throw new EdgePeftError("ids must be a non-empty array of rows of token ids, every row the same length (pad on the left)");
  }
  const vocab = manifest.vocab_size;
  for (const v of ids.flat()) {
    if (v < 0 || (vocab && v >= vocab)) {
      throw new EdgePeftError(`token id ${v} is outside the vocabulary [0, ${vocab}) of ${where}; tokenize with the base model's tokenizer`);
    }
  }
  if (manifest.max_positions && ids[0].length > manifest.max_positions) {
    throw new EdgePeftError(`sequence length ${ids[0].length} exceeds the model's ${manifest.max_positions} positions; shorten the input`);
  }
  mask = mask == null ? ids.map((row) => row.map(() => 1)) : integerRows(mask, "mask");
  if (mask.length !== ids.length || !mask.every((r) => r.length === ids[0].length)) {
    throw new EdgePeftError(`mask must have the shape of ids (${ids.length} rows of ${ids[0].length}); they must match`);
  }
  if (!mask.flat().every((v) => v === 0 || v === 1)) throw new EdgePeftError("mask must hold only 0 (padding) and 1 (token)");
  return { ids, mask };
}

/** An adapter's tensors against the base's slot table, as the Python runtime checks them. */
export function checkTensors(tensors, manifest, slots, where) {
  const fix = "re-export the adapter (edgepeft export --adapter DIR --out OUT --overwrite)";
  const axes = {};
  for (const [name, tensor] of Object.entries(tensors)) {
    const slot = slots[name];
    if (!slot) throw new EdgePeftError(`${where}: fills slot ${name}, which this base lacks; export the adapter into this OUT`);
    const shape = `${tensor.type}[${tensor.dims}]`;
    if (tensor.type !== slot.dtype || tensor.dims.length !== slot.shape.length) {
      throw new EdgePeftError(`${where}: slot ${name} is ${shape}, the base expects ${slot.dtype}[${slot.shape}]; ${fix}`);
    }
    slot.shape.forEach((want, i) => {
      const size = tensor.dims[i];
      if (typeof want === "string" ? (axes[want] ??= size) !== size : size !== want) {
        throw new EdgePeftError(`${where}: slot ${name} is ${shape}, the base expects ${slot.dtype}[${slot.shape}]; ${fix}`);
      }
    });
  }
  const listed = Object.keys(manifest.slots || {});
  if (listed.length !== Object.keys(tensors).length || !listed.every((n) => n in tensors)) {
    throw new EdgePeftError(`${where}: adapter.json and adapter.onnx disagree on the slots; ${fix}`);
  }
}

export const REEXPORT = "re-export it (edgepeft export --adapter DIR --out OUT --overwrite)";
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
