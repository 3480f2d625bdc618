// What an adapter graph may hold, read from its bytes before ONNX Runtime runs it, as the Python runtime reads it
// (runtimes/adapter_graph.py): Identity, Concat and Pad nodes over the graph's own tensors, in order; each message only
// the fields exports write (no inputs, functions, subgraphs, sparse or attribute tensors); each name defined once;
// every tensor's shape, worked out from its tensors' dims before anything runs, within what an adapter of this base
// can take. A forged node could otherwise take memory or time without bound (ConstantOfShape, a Loop). ONNX's
// protobuf is read field by field, as protobuf reads it.

const NODES = ["Identity", "Concat", "Pad"];
const [FLOAT, INT64] = [1, 7];  // TensorProto's data types: exports write float32 tensors, and a Pad's widths in int64
const SIZES = new Map([[FLOAT, 4n], [INT64, 8n]]);
const [GRAPH, NODE, INIT, OUTPUT] = [7, 1, 5, 12];  // ModelProto.graph; GraphProto.node, .initializer, .output

function varint(data, i) {
  let value = 0n, shift = 0n;
  for (;;) {
    if (i >= data.length) throw new Error("a number runs past the end");
    const byte = data[i++];
    value |= BigInt(byte & 0x7f) << shift;
    if (byte < 0x80) return [value, i];
    shift += 7n;
    if (shift > 63n) throw new Error("a number longer than 10 bytes");
  }
}

/** [field number, value] of one protobuf message: a varint's BigInt, else the [start, end] of its bytes. */
function fields(data, start = 0, end = data.length) {
  const out = [];
  for (let i = start; i < end;) {
    let key, value, j;
    [key, j] = varint(data, i);
    const field = Number(key >> 3n), wire = Number(key & 7n);
    // protobuf reads a key in 32 bits: a longer one was another field to ONNX Runtime
    if (j - i > 5 || key >= 1n << 32n || !(field > 0 && field < 2 ** 29)) throw new Error("a field key out of protobuf's range");
    i = j;
    if (wire === 0) [value, i] = varint(data, i);
    else if (wire === 2) {
      let size;
      [size, i] = varint(data, i);
      value = [i, i + Number(size)];
      i += Number(size);
    } else if (wire === 1 || wire === 5) i += wire === 1 ? 8 : 4;
    else throw new Error(`wire type ${wire}`);
    if (i > end) throw new Error("a field runs past its message");
    out.push([field, value]);
  }
  return out;
}

// ignoreBOM: a name's leading U+FEFF is kept, as Python and ONNX Runtime keep it
const text = (data, [start, end]) => new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(data.subarray(start, end));
const span = (value) => { if (!Array.isArray(value)) throw new Error("a field of the wrong kind"); return value; };

// the fields each message may hold: what exports write, and names and docs (ONNX Runtime builds an object for every
// entry of a repeated field while it parses, before it checks anything: 2 bytes of an empty attribute tensor took 400)
const ALLOWED = {
  model: [1, 2, 3, 4, 5, 6, 7, 8], opset: [1, 2], graph: [1, 2, 5, 10, 12], node: [1, 2, 3, 4, 5, 6, 7],
  attribute: [1, 3, 20], tensor: [1, 2, 7, 8, 9, 12], output: [1, 2, 3], type: [1], "tensor type": [1, 2], shape: [1],
  dim: [1, 2],
};
const MOST_DIMS = 8;  // of a tensor or an output's shape: slots have at most 4
// nodes and tensors a graph may hold per slot of its base, as Python's NODES_PER_SLOT (exports write an output per
// slot they fill: at most 4 nodes and 6 tensors each; a method of one's own may assemble up to 7 padded parts)
const NODES_PER_SLOT = 16;

/** The fields of one `what` message, refused where it holds one exports never write. */
function read(data, at, what) {
  const out = fields(data, ...span(at));
  if (what === "tensor" && out.some(([f]) => f === 13 || f === 14)) {  // external_data, data_location
    throw new Error("it reads tensors from another file (external data), where adapter graphs hold them inside");
  }
  const odd = out.find(([f]) => !ALLOWED[what].includes(f));
  if (odd) throw new Error(`its ${what} holds field ${odd[0]}, which exports never write`);
  return out;
}

/** An output's name (a ValueInfoProto), its declared type read only to see it holds what exports write. */
function output(data, at) {
  let name = "";
  for (const [field, value] of read(data, at, "output")) {
    if (field === 1) name = text(data, span(value));
    else if (field === 2) {
      for (const [, tensorType] of read(data, value, "type")) {
        for (const [f, shape] of read(data, tensorType, "tensor type")) {
          const dims = f === 2 ? read(data, shape, "shape") : [];
          if (dims.length > MOST_DIMS) throw new Error(`an output's shape has ${dims.length} dims`);
          for (const [, dim] of dims) read(data, dim, "dim");
        }
      }
    }
  }
  return name;
}

/** A repeated int64 field's numbers (packed, or one varint), signed BigInts. */
function ints(data, value) {
  const out = [];
  if (!Array.isArray(value)) out.push(value);
  else for (let i = value[0], v; i < value[1];) { [v, i] = varint(data, i); out.push(v); }
  return out.map((v) => (v >= 1n << 63n ? v - (1n << 64n) : v));
}

/** [name, dims, data_type, values of an int64 tensor else null] of a TensorProto, its fields in any order. */
function tensor(data, at) {
  let name = "", kind = null, raw = null, dims = [], values = [];
  for (const [field, value] of read(data, at, "tensor")) {
    if (field === 8) name = text(data, span(value));
    else if (field === 1) dims = dims.concat(ints(data, value));
    else if (field === 2) kind = Number(value);
    else if (field === 9) raw = span(value);
    else if (field === 7) values = values.concat(ints(data, value));
  }
  if (dims.length > MOST_DIMS || values.length > 2 * MOST_DIMS) {  // int64_data: a Pad's widths, two per axis
    throw new Error(`its tensor ${JSON.stringify(name)} has ${dims.length} dims and ${values.length} int64 values`);
  }
  if (kind !== INT64) return [name, dims, kind, null];
  if (raw) {
    const view = new DataView(data.buffer, data.byteOffset + raw[0], raw[1] - raw[0]);
    for (let i = 0; i + 8 <= view.byteLength; i += 8) values.push(view.getBigInt64(i, true));
  }
  return [name, dims, kind, values];
}

/** {op, domain, inputs, outputs, axis} of a NodeProto. */
function node(data, at) {
  const n = { op: "", domain: "", inputs: [], outputs: [], axis: 0n };
  for (const [field, value] of read(data, at, "node")) {
    if (field === 4) n.op = text(data, span(value));
    else if (field === 7) n.domain = text(data, span(value));
    else if (field === 1) n.inputs.push(text(data, span(value)));
    else if (field === 2) n.outputs.push(text(data, span(value)));
    else if (field === 5) {  // a field given twice counts as ONNX Runtime reads it, as protobuf does: the last one
      const attribute = read(data, value, "attribute");
      const names = attribute.filter(([f]) => f === 1).map(([, v]) => text(data, span(v)));
      if (names.at(-1) === "axis") {  // i, a single int64: a varint (protobuf skips one written as bytes)
        n.axis = [0n, ...attribute.filter(([f]) => f === 3).map(([, v]) => {
          if (typeof v !== "bigint") throw new Error("axis written as bytes");
          return ints(data, v)[0];
        })].at(-1);
      }
    }
  }
  return n;
}

/** The output's shape (BigInts) of an exported node from its inputs' (an Error where it is not one exports write). */
function shapeOf({ op, inputs, axis }, shapes, pads) {
  if (inputs.slice(0, op === "Pad" ? 1 : undefined).some((n) => !shapes.has(n))) {
    throw new Error(`a ${op} reads a tensor not defined before it`);
  }
  const first = shapes.get(inputs[0]);
  if (op === "Identity") return first;
  if (op === "Pad") {  // widths: an int64 tensor of the graph's own, two per axis, none negative; no axes input
    const widths = inputs.length === 2 || inputs.length === 3 ? pads.get(inputs[1]) ?? null : null;
    if (widths === null || !first.length || widths.length !== 2 * first.length || widths.some((w) => w < 0n)) {
      throw new Error(`a Pad's widths are not two per axis of a tensor of the graph's own (${widths === null ? "None"
        : `[${widths.join(", ")}]`})`);
    }
    return first.map((n, k) => n + widths[k] + widths[k + first.length]);
  }
  const k = Number(axis < 0n ? axis + BigInt(first.length) : axis);  // Concat
  const others = (shape) => shape.filter((_, j) => j !== k).join(",");
  if (!(k >= 0 && k < first.length) || inputs.some((n) => shapes.get(n).length !== first.length ||
      others(shapes.get(n)) !== others(first))) throw new Error("a Concat of tensors whose shapes do not fit");
  return first.map((d, j) => (j === k ? inputs.reduce((sum, n) => sum + shapes.get(n)[k], 0n) : d));
}

/** What an adapter graph's bytes hold that an export never writes, else null; `most`: the bytes an adapter of this
 * base may take (its tensors, what its nodes compute, and its outputs, which JavaScript copies); `slots`: how many
 * the base has (undefined: no bound on the count of outputs, nodes and tensors). */
export function adapterGraphProblem(bytes, most, slots) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  try {
    const model = read(data, [0, data.length], "model");
    const graphs = model.filter(([f]) => f === GRAPH).map(([, v]) => v);
    if (graphs.length !== 1 || model.filter(([f]) => f === 8).length > MOST_DIMS) return "it is not one graph of its own";
    for (const [, opset] of model.filter(([f]) => f === 8)) read(data, opset, "opset");
    const graph = read(data, graphs[0], "graph");
    const count = (field) => graph.reduce((n, [f]) => n + (f === field), 0);
    const [outs, nodes, inits] = [count(OUTPUT), count(NODE), count(INIT)];
    if (slots !== undefined && (outs > slots || Math.max(nodes, inits) > NODES_PER_SLOT * slots)) {
      return `it holds ${outs} outputs, ${nodes} nodes and ${inits} tensors, where an export writes an output per ` +
        `slot of its base (${slots} here) and at most ${NODES_PER_SLOT} nodes and tensors a slot`;
    }
    const shapes = new Map(), kinds = new Map(), pads = new Map();
    for (const [name, dims, kind, values] of graph.filter(([f]) => f === INIT).map(([, v]) => tensor(data, v))) {
      if (shapes.has(name) || dims.some((d) => d < 0n) || !SIZES.has(kind)) {
        return `its tensor ${JSON.stringify(name)} is defined twice, has a negative size, or is not float32 or int64`;
      }
      shapes.set(name, dims);
      kinds.set(name, kind);
      if (values) pads.set(name, values);
    }
    for (const n of graph.filter(([f]) => f === NODE).map(([, v]) => node(data, v))) {
      if (!NODES.includes(n.op) || !["", "ai.onnx"].includes(n.domain) || n.outputs.length !== 1) {
        return `it holds a ${n.domain ? `${n.domain}.` : ""}${n.op} node (exports write ${NODES.join(", ")} only)`;
      }
      if (shapes.has(n.outputs[0])) return `its tensor ${JSON.stringify(n.outputs[0])} is defined twice`;
      shapes.set(n.outputs[0], shapeOf(n, shapes, pads));
      kinds.set(n.outputs[0], kinds.get(n.inputs[0]));  // each node's output is of its (first) input's type
    }
    const outputs = graph.filter(([f]) => f === OUTPUT).map(([, v]) => output(data, v));
    if (new Set(outputs).size < outputs.length || outputs.some((n) => !shapes.has(n))) {
      return "its outputs name a tensor twice, or one it does not define";
    }
    const bytesOf = (name) => shapes.get(name).reduce((p, d) => p * d, 1n) * SIZES.get(kinds.get(name));
    const total = [...shapes.keys(), ...outputs].reduce((sum, name) => sum + bytesOf(name), 0n);
    if (total > BigInt(most)) {
      return `its nodes would make ${total} bytes of tensors, more than an adapter of this base can take (${most})`;
    }
  } catch (e) {
    return `it is not a graph an export writes (${e.message})`;
  }
  return null;
}
