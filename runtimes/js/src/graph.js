// What an adapter graph may hold, read from its bytes before ONNX Runtime runs it, as the Python runtime reads it
// (runtimes/adapter_graph.py): Identity, Concat and Pad nodes over the graph's own tensors, each read once, no
// functions or subgraphs, no Pad wider than the base's widest slot. A forged node could otherwise take memory or
// time without bound (ConstantOfShape, a Loop). ONNX's protobuf is read field by field.

const NODES = ["Identity", "Concat", "Pad"];
const INT64 = 7;  // TensorProto.INT64

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
    let key, value;
    [key, i] = varint(data, i);
    const field = Number(key >> 3n), wire = Number(key & 7n);
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

const text = (data, [start, end]) => new TextDecoder("utf-8", { fatal: true }).decode(data.subarray(start, end));
const signed = (v) => (v >= 1n << 63n ? v - (1n << 64n) : v);

/** [name, values] of an int64 TensorProto (raw_data, or int64_data packed or not); values null for other types. */
function int64s(data, span) {
  let name = "", kind = null, raw = null;
  const values = [];
  for (const [field, value] of fields(data, ...span)) {  // in any order: a forger need not write them as protobuf does
    if (field === 8) name = text(data, value);
    else if (field === 2) kind = Number(value);
    else if (field === 9) raw = value;
    else if (field === 7 && Array.isArray(value)) {
      for (let i = value[0], v; i < value[1];) { [v, i] = varint(data, i); values.push(signed(v)); }
    } else if (field === 7) values.push(signed(value));
  }
  if (kind !== INT64) return [name, null];
  if (raw) {
    const view = new DataView(data.buffer, data.byteOffset + raw[0], raw[1] - raw[0]);
    for (let i = 0; i + 8 <= view.byteLength; i += 8) values.push(view.getBigInt64(i, true));
  }
  return [name, values];
}

/** What an adapter graph's bytes hold that an export never writes, else null; `widest`: the base's widest slot. */
export function adapterGraphProblem(bytes, widest) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  try {
    const model = fields(data);
    const graphs = model.filter(([f]) => f === 7).map(([, v]) => v);
    if (model.some(([f]) => f === 25) || graphs.length !== 1) return "it is not one graph of its own (functions, or no graph)";
    const nodes = [], ints = new Map();
    for (const [field, value] of fields(data, ...graphs[0])) {
      if (field === 1) nodes.push(value);
      else if (field === 5) {
        const [name, values] = int64s(data, value);
        if (values) ints.set(name, values);
      }
    }
    const read = [];
    for (const span of nodes) {
      let op = "", domain = "", sub = false;
      const inputs = [];
      for (const [field, value] of fields(data, ...span)) {
        if (field === 4) op = text(data, value);
        else if (field === 7) domain = text(data, value);
        else if (field === 1) inputs.push(text(data, value));
        else if (field === 5) sub ||= fields(data, ...value).some(([f]) => f === 6 || f === 11);  // an attribute's graph(s)
      }
      if (!NODES.includes(op) || !["", "ai.onnx"].includes(domain) || sub) {
        return `it holds a ${domain ? `${domain}.` : ""}${op} node (exports write ${NODES.join(", ")} only)`;
      }
      if (op === "Pad") {  // its widths: an int64 tensor of the graph's own, each in bounds
        const pads = ints.get(inputs[1]) ?? null;
        if (pads === null || pads.some((p) => p < 0n || p > BigInt(widest))) {
          return `a Pad's widths (${pads === null ? "None" : `[${pads.join(", ")}]`}) are not the graph's own, from 0 to ` +
            `the base's widest slot (${widest})`;
        }
      }
      read.push(...inputs.filter((n) => n));  // "": an optional input left out
    }
    if (new Set(read).size !== read.length) return "it reads one tensor twice (exports read each once)";
  } catch (e) {
    return `it is not a readable ONNX graph (${e.message})`;
  }
  return null;
}
