// How the runtime runs its ONNX Runtime sessions (the Python runtime's runtimes/sessions.py, in JavaScript's terms), and
// the float32 tensors it repeats, slices and joins between runs.

import { EdgePeftError, OutOfMemoryError } from "./checks.js";

let creating = Promise.resolve();  // onnxruntime-web's session creations, in turn

/**
 * `ort.InferenceSession.create(...args)`, one at a time on onnxruntime-web: its wasm build mounts a graph's external
 * data by file name in one table every creation in flight shares, and clears the whole table when any creation ends,
 * so two exports opened at once (each base's "model.onnx.data") computed with each other's weights or failed to
 * load. onnxruntime-node creates them at once.
 */
export function createSession(ort, source, options = {}) {
  // a copy: onnxruntime-web writes extra.session.use_ort_model_bytes_directly into the options it is given (the app's
  // own object, and the runtime's, whose keys then read as "sessionOptions given" for a failure they had no part in)
  const own = { ...options, ...(options.extra && { extra: { ...options.extra, ...(options.extra.session && {
    session: { ...options.extra.session } }) } }) };
  if (ort.env?.versions?.node !== undefined) return ort.InferenceSession.create(source, own);
  const created = creating.then(() => ort.InferenceSession.create(source, own));
  creating = created.catch(() => {});  // a failed creation is its caller's; the next one runs
  return created;
}

/**
 * The base session's runs, one at a time: onnxruntime-web's wasm runs of one session share its stack, and two calls
 * awaited at once (Promise.all, a button clicked twice) hung the process or the page. onnxruntime-node's runs are
 * queued in its thread pool anyway, so waiting a turn costs it nothing.
 */
export class TakingTurns {
  constructor(session, where, options = {}) {
    this.session = session;
    this.where = where;  // the graph, as errors name it
    this.turn = Promise.resolve();
    this.webgpu = (options.executionProviders ?? []).some((p) => (p?.name ?? p) === "webgpu");
  }

  get inputNames() {
    return this.session.inputNames;
  }

  run(feeds) {
    // onnxruntime-web's WebGPU backend binds no empty tensor: a slot left at its empty neutral value (the base model,
    // an adapter filling some slots) was a raw TypeError, and every later run on the session hung (a web hunt)
    const empty = this.webgpu && Object.keys(feeds).filter((n) => !n.startsWith("past_key_values") && feeds[n].size === 0);
    if (empty.length) {
      return Promise.reject(new EdgePeftError(`${this.where}: WebGPU cannot run this call, which leaves ${empty.length} ` +
        `of the base's slots empty (${empty.slice(0, 3).join(", ")}${empty.length > 3 ? ", ..." : ""}: the base model, or ` +
        "an adapter that fills some of them), as onnxruntime-web's WebGPU backend binds no empty tensor; open the " +
        "export with executionProviders [\"wasm\"] for it"));
    }
    const run = this.turn.then(() => this.session.run(feeds, QUIET))
      .catch((e) => { throw outOfMemory(e, this.where, feeds) ?? e; });
    this.turn = run.catch(() => {});  // a failed run is its caller's; the next one runs
    return run;
  }

  /** Release the session once the runs already queued are done (wasm sessions are freed by release only). */
  release() {
    const released = this.turn.then(() => this.session.release?.());
    this.turn = released.catch(() => {});
    return released;
  }
}

const NO_MEMORY = /Failed to allocate memory[^\n]*|bad[ _]alloc\w*|out of memory/;  // CPU arena, C++, CUDA (as sessions.py)
const QUIET = { logSeverityLevel: 4 };  // a kernel's failure is thrown, not also logged in red above the app's own message

/** ONNX Runtime's allocation failure in a run, as an OutOfMemoryError naming the batch and the fix (else null): the
 * Python runtime's wording (OutOfMemoryError.of). */
function outOfMemory(e, where, feeds) {
  const found = NO_MEMORY.exec(String(e?.message ?? e));
  const [rows, positions] = feeds.attention_mask?.dims ?? [];
  return found && new OutOfMemoryError(`${where}: a batch of ${rows} row(s) x ${positions} positions does not fit in ` +
    `memory here (${found[0].slice(0, 120)}); use a smaller batch or shorter inputs`);
}

/** A graph with no inputs, run once; its session is released (else it leaks). */
export async function runOnce(session) {
  try {
    return await session.run({});
  } finally {
    await session.release?.().catch(() => {});  // a failed release must not hide what run did
  }
}

export function repeat(Tensor, tensor, batch) {  // (1, ...) -> (batch, ...): a prefix's cache start for every row
  const data = new Float32Array(tensor.data.length * batch);
  for (let b = 0; b < batch; b++) data.set(tensor.data, b * tensor.data.length);
  return new Tensor("float32", data, [batch, ...tensor.dims.slice(1)]);
}

export function rowOf(Tensor, tensor, b) {  // row b of a (batch, ...) float32 tensor
  const size = tensor.data.length / tensor.dims[0];
  return new Tensor("float32", tensor.data.slice(b * size, (b + 1) * size), [1, ...tensor.dims.slice(1)]);
}

export function joined(Tensor, tensors) {  // (1, ...) float32 tensors -> (n, ...)
  const data = new Float32Array(tensors.reduce((n, t) => n + t.data.length, 0));
  let at = 0;
  for (const t of tensors) { data.set(t.data, at); at += t.data.length; }
  return new Tensor("float32", data, [tensors.length, ...tensors[0].dims.slice(1)]);
}
