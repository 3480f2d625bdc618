// A call's ids, mask and token types, checked as the Python runtime checks them (runtimes/inputs.py): rows of whole
// numbers of one shape, ids in the vocabulary, a 0/1 mask (left padding where a decoder generates), token types in
// the model's range where the graph takes them (a seq-cls BERT's token_type_ids: text pairs).

import { EdgePeftError, described, fromBigint } from "./checks.js";
import { pairsFix } from "./fixes.js";

const KINDS = { ids: "token ids", mask: "0 and 1", tokenTypeIds: "token types" };  // what each holds, as messages say

/** A Float16/32/64Array, or an instance of a subclass of one: its toStringTag is the typed array type's (a constructor's
 * name is the subclass's own). */
export const floatArray = (x) => ArrayBuffer.isView(x) && /^\[object Float/.test(Object.prototype.toString.call(x));

/** Rows of whole numbers from arrays or typed arrays of numbers or bigints (ONNX Runtime's int64 tensors give those). */
function integerRows(x, what) {
  const isRow = (r) => Array.isArray(r) || ArrayBuffer.isView(r);
  if (isRow(x) && x.length && !isRow(x[0])) x = [x];  // one row given flat
  if (!Array.isArray(x) || !x.length || !x.every(isRow)) {
    throw new EdgePeftError(`${what} must be a non-empty array of rows (2-D: batch x sequence), every row the same length (pad on the left)`);
  }
  const floats = x.find(floatArray);  // as Python's dtype check
  if (floats) {
    throw new EdgePeftError(`${what} must be ${KINDS[what]} (integers: numbers, an Int32Array, a BigInt64Array), got ${described(floats)}`);
  }
  return x.map((row) => Array.from(row, (v) => {
    if (isRow(v)) throw new EdgePeftError(`${what} must be rows of numbers (2-D: batch x sequence); got more levels of arrays`);
    v = fromBigint(v);
    if (typeof v === "boolean" && what === "mask") return Number(v);
    if (!Number.isInteger(v)) throw new EdgePeftError(`${what} must hold whole numbers; got ${described(v)}`);
    return v;
  }));
}

/** rows (already checked) of the ids' shape, or EdgePeftError naming `what` and the shape it must have. */
function sameShape(rows, ids, what) {
  if (rows.length !== ids.length || !rows.every((r) => r.length === ids[0].length)) {
    throw new EdgePeftError(`${what} must have the shape of ids (${ids.length} rows of ${ids[0].length}); they must match`);
  }
  return rows;
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
    throw new EdgePeftError(`sequence length ${ids[0].length} exceeds the model's ${manifest.max_positions} positions; shorten the ` +
      `input to ${manifest.max_positions} tokens, less a prompt or prefix adapter's virtual tokens`);
  }
  mask = mask == null ? ids.map((row) => row.map(() => 1)) : sameShape(integerRows(mask, "mask"), ids, "mask");
  if (!mask.flat().every((v) => v === 0 || v === 1)) throw new EdgePeftError("mask must hold only 0 (padding) and 1 (token)");
  return { ids, mask };
}

/**
 * A call's tokenTypeIds (rows like ids) as rows of numbers, or null: none given, or all 0 where the graph takes none
 * (every token is of type 0 there). `types`: the graph's token types (rt.typeVocabSize), null where it takes none; a
 * type outside them is refused, and so is any type but 0 where the graph takes none (an export made before edgepeft
 * served text pairs, or of a model without token types), as the Python runtime's check_token_types refuses them.
 */
export function checkTokenTypes(tokenTypeIds, ids, types, where, manifest = {}) {
  if (tokenTypeIds == null) return null;
  const rows = sameShape(integerRows(tokenTypeIds, "tokenTypeIds"), ids, "tokenTypeIds");
  let lo = 0, hi = 0;
  for (const v of rows.flat()) [lo, hi] = [Math.min(lo, v), Math.max(hi, v)];
  if (types === null && (lo || hi)) {
    throw new EdgePeftError(`${where}: this export takes no token_type_ids (only a seq-cls export of a model with ` +
      `token types, BERT's, does; for one exported before edgepeft served text pairs, ${pairsFix(manifest)}); pass none`);
  }
  if (types !== null && (lo < 0 || hi >= types)) {
    throw new EdgePeftError(`token type ${hi >= types ? hi : lo} is outside the model's [0, ${types}); give 0 for a ` +
      "text's (or a pair's first) tokens, 1 for a pair's second");
  }
  return types === null ? null : rows;
}

/**
 * The mask a decoder generates with (Python's generation_mask): the caller's, else, where `told` (no mask given and
 * the model's padding id `pad` is a token), 0 where a row holds `pad`; refused where a row has no tokens or has
 * padding after its tokens (generation needs it on the left).
 */
export function generationMask(ids, mask, told, pad) {
  if (told) mask = ids.map((row) => row.map((t) => (t === pad ? 0 : 1)));
  if (mask.some((row) => !row.includes(1))) {
    throw new EdgePeftError(told ? `an ids row is all padding (${pad}) and no mask was given; pass the mask`
      : "a prompt row has no tokens (its mask is all 0)");
  }
  const right = mask.findIndex((row) => row.some((m, i) => i > 0 && m < row[i - 1]));  // a 0 after a 1
  if (right >= 0) {
    const row = mask[right], hole = row.slice(row.findIndex((m, i) => i > 0 && m < row[i - 1])).includes(1);  // as Python
    throw new EdgePeftError(told ? `ids row ${right} holds the padding id ${pad} after a token and no mask was given; pass one: ones where these are real tokens, else the mask that marks the padding`
      : hole ? `mask row ${right} masks out some of its tokens (a 0 between 1s), which generation does not take; leave those tokens out of the ids instead`
        : `mask row ${right} has padding after its tokens; generation needs the padding on the left`);
  }
  return mask;
}
