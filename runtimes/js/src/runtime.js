// The edgepeft runtime for JavaScript: one base session, adapters staged once as tensors, switched per call.
//
//   const rt = await Runtime.open(ort, loader)      // loader: src/node.js (files) or src/web.js (fetch)
//   await rt.loadAdapter("intent")                 // runs OUT/adapters/intent/adapter.onnx once
//   rt.forward(ids, mask, { adapter: "intent" })   // ids, mask: arrays of rows of numbers (tokenTypeIds: a pair's)
//   rt.generate(ids, mask, { adapter, maxNewTokens }) // with the KV cache, as the model's generation_config says
//
// It mirrors the Python Runtime (runtimes/runtime.py) on the same export: the base graph is
// OUT/base/model.web.onnx, whose adapter slots are required inputs (ONNX Runtime's JavaScript
// bindings list only those), and OUT/base/neutral.onnx gives every slot's neutral value, bound
// wherever the call's adapter fills nothing. Slots are bound by the fields the manifest declares:
// "phase" prefill (a prompt: first step only), "target" (a prefix: the start of a cache input),
// "virtual_axis" (tokens added to the mask and the positions). No method names here.

import {
  EdgePeftError, REEXPORT, REEXPORT_BASE, adapterSessionOptions, axisSharing, cacheNames, checkFormat,
  checkOpenArguments, checkOptions, checkSizes, checkTensors, described, firstLine, fromBigint, namedLabels, olderRuntime, readJson, reexportFor,
  sessionOptionsOf,
} from "./checks.js";
import { TOKEN_TYPES, graphDeclarationErrors } from "./base_checks.js";
import { NAME_RULE, adapterName, folderFix, missingAdapter, notLoaded, olderExport } from "./fixes.js";
import { adapterGraphProblem } from "./graph.js";
import { checkInputs, checkTokenTypes, generationMask } from "./inputs.js";
import { GENERATION_OPTIONS, classify, forPrompt, generationSettings, generator, pick, processScores } from "./sampling.js";
import { TakingTurns, createSession, joined, repeat, rowOf, runOnce } from "./sessions.js";
import { sha256 } from "./sha256.js";

export { EdgePeftError, classify };
export { OutOfMemoryError } from "./checks.js";

const int64 = (rows) => BigInt64Array.from(rows.flat(), (v) => BigInt(v));
const RELEASED = "this Runtime was released; open the export again";
const PYTHON_ONLY = "; stop strings and mixed batches (one adapter per row) are the Python runtime's only";

export class Runtime {
  /** Open an export: its manifest, the base session, the neutral values; adapters load with loadAdapter. */
  static async open(ort, loader, options = {}) {
    const { sessionOptions } = checkOptions(options, ["sessionOptions"], "Runtime.open",
      " (ONNX Runtime's own options, executionProviders included, go inside sessionOptions)");
    checkOpenArguments(ort, loader);
    const rt = new this();  // a loader's own kind of Runtime (node.js: FolderRuntime)
    Object.assign(rt, { ort, loader });
    rt.sessionOptions = sessionOptionsOf(sessionOptions);
    const m = rt.manifest = await rt.json("base/edgepeft.json", null);
    checkFormat(m, "edgepeft-base", loader.where("base/edgepeft.json"));
    if (!m.web_graph) throw new EdgePeftError(`${loader.where("base")}: this export has no model.web.onnx; ${REEXPORT_BASE}`);
    await checkSizes(loader, m, [m.web_graph, `${m.graph}.data`, m.neutral_graph].filter(Boolean));
    rt.session = new TakingTurns(await rt.opened(`base/${m.web_graph}`,
      (o) => loader.session(ort, `base/${m.web_graph}`, o, true)), loader.where(`base/${m.web_graph}`), rt.sessionOptions);
    try {
      await rt.checkedOpen(m);
    } catch (e) {  // the session is freed (wasm frees one on release only: 80 MB a failed open kept)
      await rt.session.release().catch(() => {});
      throw e;
    }
    return rt;
  }

  /** The base's neutral values and slots, checked against the session: the rest of open. */
  async checkedOpen(m) {
    const { loader, ort } = this;
    // neutral.onnx: every slot's neutral value (none in a merged classifier, which has no slot)
    const neutral = `base/${m.neutral_graph}`;  // run inside opened: a graph taking inputs is named as damaged
    this.neutral = m.neutral_graph ? await this.opened(neutral, async (o) => runOnce(await loader.session(ort, neutral, o, false))) : {};
    this.slots = Object.fromEntries(m.slots.map((s) => [s.name, s]));
    this.sharing = axisSharing(this.slots);  // what each adapter's tensors are checked against
    // the most an adapter may take: 4x the base (as Python; 2 GiB where an older export recorded no sizes)
    const recorded = (m.file_bytes?.[m.graph] ?? 0) + (m.file_bytes?.[`${m.graph}.data`] ?? 0);
    this.most = recorded ? 4 * recorded + 64 * 2 ** 20 : 2 ** 31;
    const unbound = m.slots.find((s) => !s.target && !(s.name in this.neutral));  // an input no run would feed
    if (unbound) {
      throw new EdgePeftError(`${m.neutral_graph ? `${loader.where(neutral)}: gives no value for slot ${unbound.name}`
        : `${loader.where("base")}: this export has no neutral.onnx`}; ${REEXPORT_BASE}`);
    }
    const required = new Set(this.session.inputNames);
    const missing = Object.keys(this.neutral).filter((n) => !required.has(n));
    if (missing.length) {  // a feed the session does not list would be dropped in silence (onnxruntime-node)
      throw new EdgePeftError(`${loader.where("base")}: the session does not take slot ${missing[0]}; it would run the base model`);
    }
    const [wrong] = graphDeclarationErrors(this.session.session, m);
    if (wrong) throw new EdgePeftError(`${loader.where("base/edgepeft.json")}: ${wrong}; ${REEXPORT_BASE}`);
    this.outputName = Object.keys(m.outputs)[0];
    // a seq-cls BERT's token types (base_checks: given where the graph takes them), else null: it takes none
    this.typeVocabSize = Object.hasOwn(m.inputs, TOKEN_TYPES) ? m.type_vocab_size : null;
    this.cache = m.cache;
    this.rowsApart = m.ops === "contrib";  // see run()
    this.pastNames = this.cache ? cacheNames(this.cache, "past") : [];
    this.presentNames = this.cache ? cacheNames(this.cache, "present") : [];
    this.baseLabels = namedLabels(m.labels, loader.where("base/edgepeft.json"));
    this.adapters = new Map();
    this.holds = new Map();  // name -> calls in flight using it (counted): unloadAdapter waits for none
  }

  json(rel, missing) {
    return readJson(this.loader, rel, missing, reexportFor(rel));
  }

  /** make(sessionOptions), its failure named: the sessionOptions given where it opens without them, else the file. */
  async opened(rel, make) {
    try {
      return await make(this.sessionOptions);
    } catch (e) {
      if (e instanceof EdgePeftError && !e.missing) throw e;
      const reason = firstLine(e);
      const plain = async () => { await (await make({}))?.release?.(); return true; };
      if (!e.missing && Object.keys(this.sessionOptions).length && await plain().catch(() => false)) {
        throw new EdgePeftError(`${this.loader.where(rel)}: ONNX Runtime cannot load it with the sessionOptions given ` +
          `(${reason}); it loads without them: start from {} and add options one by one`);
      }
      const what = e instanceof EdgePeftError ? "missing from the export" : `ONNX Runtime cannot load it (${reason})`;
      const fix = e.missing ? reexportFor(rel) : olderRuntime(this.ort) || `the file is damaged or incomplete: ${reexportFor(rel)}`;
      throw new EdgePeftError(`${this.loader.where(rel)}: ${what}; ${fix}`);
    }
  }

  /** Free the base session once the calls already made are done, a generate's every step included (wasm frees one
   * on release only: ~90 MB per open kept); later calls are refused. */
  release() {
    this.released ??= (async () => {  // a second release waits for the first (it returned at once)
      if (this.inFlight) await new Promise((resolve) => { this.settled = resolve; });
      await this.session.release();
    })();
    return this.released;
  }

  /** call() as a call release() waits for (it swapped in a refusing session at once: a generate's decode steps failed),
   * holding its adapter: unloadAdapter refuses it until the call is done, as the Python runtime does. */
  async counted(call, adapter) {
    if (this.released) throw new EdgePeftError(RELEASED);
    this.inFlight = (this.inFlight ?? 0) + 1;
    const held = typeof adapter === "string" && this.adapters.has(adapter) ? adapter : null;
    if (held) this.holds.set(held, (this.holds.get(held) ?? 0) + 1);
    try {
      return await call();
    } finally {
      if (held && this.holds.set(held, this.holds.get(held) - 1).get(held) === 0) this.holds.delete(held);
      if (--this.inFlight === 0) this.settled?.();
    }
  }

  /** How classify scores a classifier's logits: the base config's problem_type (null: softmax, or one output's sigmoid). */
  get problemType() {
    olderExport(this.loader.where("base"), this.manifest, "seq-cls");
    return this.manifest.problem_type ?? null;
  }

  get adapterNames() {
    return [...this.adapters.keys()].sort();
  }

  /** Stage an adapter of OUT/adapters by name: run its graph once and sort its tensors by how they are bound. */
  async loadAdapter(name, ...more) {
    if (this.released) throw new EdgePeftError(RELEASED);
    const renamed = more.some((v) => v !== undefined);  // Python's load_adapter(path, name) renames; this loads by name
    if (!adapterName(name) || renamed) {
      throw new EdgePeftError(renamed ? `loadAdapter takes one argument, an adapter's name, got ${[name, ...more].map(described)}; ` +
        "it loads under its folder's name (Python's load_adapter(path, name) renames)" : `${NAME_RULE}, got ${described(name)}`);
    }
    const where = this.loader.where(`adapters/${name}`), json = `adapters/${name}/adapter.json`;
    const manifest = await this.json(json, missingAdapter(name, this.manifest.merged_adapter));
    checkFormat(manifest, "edgepeft-adapter", this.loader.where(json));
    if (manifest.base_fingerprint !== this.manifest.fingerprint) {  // OUT's base re-exported since it was opened?
      const since = (await this.json("base/edgepeft.json", null).catch(() => null))?.fingerprint === manifest.base_fingerprint;
      const merged = !since && this.manifest.merged_adapter;  // Python's words: the fixes that work (folderFix)
      throw new EdgePeftError(`${where}: ${merged ? `${this.loader.where("base")} holds a --merge export (${merged}), ` +
        "which takes no adapters" : `made for ${since ? "the base OUT holds now, re-exported since this Runtime opened it"
        : "another base"} (fingerprint ${manifest.base_fingerprint.slice(0, 12)}, this base ${this.manifest.fingerprint
        .slice(0, 12)})`}; ${since ? "open the export again to serve it" : await folderFix(this, name, merged, manifest)}`);
    }
    this.loading ??= new Set();  // names being loaded: two loads of one name at once must not both pass the check
    if (this.adapters.has(name) || this.loading.has(name)) {
      throw new EdgePeftError(`${this.loader.where(`adapters/${name}`)}: an adapter named ${name} is ` + (this.adapters.has(name)
        ? "loaded already; unloadAdapter it first" : "being loaded by another call; await that call's loadAdapter"));
    }
    this.loading.add(name);
    let tensors;
    try {
      // the graph's bytes against adapter.json's checksum (a cache may serve an old adapter.onnx after a re-export)
      const graph = `adapters/${name}/${manifest.graph}`;
      const bytes = await this.opened(graph, () => this.loader.bytes(graph, this.most));
      if ((await sha256(bytes)) !== manifest.sha256) {
        throw new EdgePeftError(`${this.loader.where(graph)}: checksum does not match adapter.json (truncated, modified or ` +
          `a stale copy); ${REEXPORT}`);
      }
      const problem = adapterGraphProblem(bytes, this.most, Object.keys(this.slots).length);  // before it runs: a forged node could take any memory or time
      if (problem) throw new EdgePeftError(`${this.loader.where(graph)}: ${problem}; ${REEXPORT}`);
      // its tensors are inside: a session that reads no file (graph.js refused external data above)
      const session = await this.opened(graph, (o) => createSession(this.ort, bytes, adapterSessionOptions(o)));
      tensors = await runOnce(session).catch((e) => {  // as Python names it (a raw ONNX Runtime error otherwise)
        throw new EdgePeftError(`${this.loader.where(graph)}: ONNX Runtime cannot run the adapter graph ` +
          `(${firstLine(e)}); ${REEXPORT}`);
      });
      const lost = session.outputNames.find((n) => !Object.hasOwn(tensors, n));  // "__proto__": no key of its own
      if (lost !== undefined) {
        throw new EdgePeftError(`${where}: fills slot ${lost}, which this base lacks; export the adapter into this OUT`);
      }
    } finally {
      this.loading.delete(name);
    }
    checkTensors(tensors, manifest, this.slots, this.sharing, where);
    const labels = namedLabels(manifest.labels, this.loader.where(json));  // classify names adapter.json where they do not fit
    const plan = { every: {}, prefill: {}, past: {}, nPast: 0, nPrepend: 0, nInside: 0, labels };
    for (const [slotName, tensor] of Object.entries(tensors)) {
      const slot = this.slots[slotName];
      if (slot.target) plan.past[slot.target] = tensor;
      else (slot.phase === "prefill" ? plan.prefill : plan.every)[slotName] = tensor;
      if (slot.virtual_axis != null) {
        if (slot.target) plan.nPast = tensor.dims[slot.virtual_axis];
        else plan.nPrepend += tensor.dims[slot.virtual_axis];
      }
      // tokens the graph puts before the keys itself (an encoder's prefix): positions only, not the mask
      if (slot.position_axis != null) plan.nInside = tensor.dims[slot.position_axis];
    }
    const started = Object.keys(plan.past);
    if (started.length && (started.length !== this.pastNames.length || !this.pastNames.every((n) => n in plan.past))) {
      throw new EdgePeftError(`${where}: the adapter starts ${started.length} of the ${this.pastNames.length} cache inputs; ${REEXPORT}`);
    }
    this.adapters.set(name, plan);
    return name;
  }

  unloadAdapter(name) {
    if (typeof name !== "string") throw new EdgePeftError(`unloadAdapter takes one adapter's name (a string), got ${described(name)}`);
    if (!this.adapters.has(name)) throw this.notLoaded(name);  // a merged export's name too, as in Python
    const calls = this.holds.get(name);
    if (calls) throw new EdgePeftError(`adapter ${described(name)} is in use by ${calls} call(s); unload it when they finish`);
    this.adapters.delete(name);
  }

  notLoaded(adapter) { return new EdgePeftError(notLoaded(adapter, this.adapterNames, this.manifest.merged_adapter)); }

  /** No adapter, or the one a --merge export folded into the base: calls run the base graph as it is. */
  servesBase(adapter) {
    return adapter == null || adapter === this.manifest.merged_adapter;
  }

  labels(adapter) {  // a copy, as Python's: an app sorting it for a menu renamed every later classify's classes
    const labels = this.servesBase(adapter) ? this.baseLabels : this.plan(adapter).labels;
    return namedLabels(labels, labels?.where);  // the manifest that gives them kept (classify names it)
  }

  plan(adapter) {
    if (adapter != null && typeof adapter !== "string") {
      throw new EdgePeftError(`adapter must be one loaded adapter's name or null (the base model), got ${described(adapter)}` +
        "; mixed and weighted batches are the Python runtime's only");
    }
    if (this.servesBase(adapter)) return { every: {}, prefill: {}, past: {}, nPast: 0, nPrepend: 0, nInside: 0 };
    const plan = this.adapters.get(adapter);
    if (!plan) throw this.notLoaded(adapter);
    return plan;
  }

  /** Run the base with an adapter (null: the base model); returns {logits} or {last_hidden_state} as an ort Tensor.
   * tokenTypeIds: rows like ids (a text pair's second text 1) where the graph takes them (typeVocabSize of them), else none. */
  forward(ids, mask, options = {}) {
    return this.counted(() => this.forwardNow(ids, mask, options), options?.adapter);
  }

  async forwardNow(ids, mask, options) {
    const { adapter = null, tokenTypeIds = null } = checkOptions(options, ["adapter", "tokenTypeIds"], "forward");
    const plan = this.plan(adapter);
    ({ ids, mask } = checkInputs(ids, mask, this.manifest, this.loader.where("base")));
    const types = checkTokenTypes(tokenTypeIds, ids, this.typeVocabSize, this.loader.where("base"), this.manifest);
    this.checkLength(plan, ids[0].length, 0);
    const { full, positions } = this.virtualInputs(plan, mask, false);
    const out = await this.run(plan, ids, full, positions, null, true, 0n, types);
    return { [this.outputName]: out[this.outputName] };
  }

  /** Generation with the KV cache, greedy or sampled (sampling.js: transformers' settings, camelCase, the model's
   * generation_config.json where a call leaves them unset); rows left-padded; returns ids (prompt included). */
  generate(ids, mask, options = {}) {
    return this.counted(() => this.generateNow(ids, mask, options), options?.adapter);
  }

  async generateNow(ids, mask, options) {
    const { adapter = null, eosTokenId: eos = null, ...settings } =
      checkOptions(options, ["adapter", "eosTokenId", ...GENERATION_OPTIONS], "generate", PYTHON_ONLY);
    const where = this.loader.where("base");  // a classifier's, an embedder's: Python's words
    if (!this.cache) throw new EdgePeftError(`${where}: a ${this.manifest.task} export has no text generation; export a causal-lm adapter`);
    olderExport(where, this.manifest, "causal-lm");
    let s = generationSettings(this.manifest, settings);
    const plan = this.plan(adapter);
    const given = mask != null;
    ({ ids, mask } = checkInputs(ids, mask, this.manifest, this.loader.where("base")));
    s = forPrompt(s, ids[0].length, this.checkLength(plan, ids[0].length, 0));  // the room left: the default's cap
    const maxNewTokens = s.maxNewTokens;
    const eosGiven = eos ?? s.modelEos ?? this.manifest.eos_token_id ?? [];  // null: the model's; an id or a list
    const eosTokenId = (Array.isArray(eosGiven) || ArrayBuffer.isView(eosGiven) ? [...eosGiven] : [eosGiven]).map(fromBigint);
    if (!eosTokenId.every((v) => Number.isInteger(v))) {  // as Python: an id < 0 is taken and never matches
      throw new EdgePeftError(`eosTokenId must be a token id or a list of token ids (integers), got ${described(eosGiven)}`);
    }
    const pad = s.callPad ?? this.padIdOr(eosTokenId);
    // no mask: left padding told by the padding id (the call's, else the model's; not an eos fallback), as transformers
    const told = !given && (s.callPad ?? this.modelPadId()) !== null && !eosTokenId.includes(pad) && ids.some((row) => row.includes(pad));
    mask = generationMask(ids, mask, told, pad);
    this.checkLength(plan, ids[0].length, maxNewTokens - 1, s.fromLength);  // the last new token is never fed back
    let { full, positions } = this.virtualInputs(plan, mask, true);
    const sequences = ids.map((row) => [...row]);
    const done = ids.map(() => false);
    const padding = mask.map((row) => row.indexOf(1));  // each row's left padding: no repetition penalty there
    const random = generator(s.seed);
    let out = await this.run(plan, ids, full, positions, null, true, 1n);
    for (let step = 0; step < maxNewTokens; step++) {
      const logits = out.logits;  // (B, 1, V): the last position only; (B, T, V) where the graph takes no logits_to_keep
      const [, width, vocab] = logits.dims, last = (b) => (b * width + width - 1) * vocab;
      const tokens = sequences.map((row, b) => {
        if (done[b]) return s.padTokenId ?? pad;
        const scores = processScores(logits.data.subarray(last(b), last(b) + vocab), row, s, padding[b], ids[0].length, eosTokenId);
        return pick(scores, s, random);
      });
      tokens.forEach((t, b) => { sequences[b].push(t); if (eosTokenId.includes(t)) done[b] = true; });
      if (done.every(Boolean) || step + 1 === maxNewTokens) break;
      full = full.map((row) => [...row, 1]);
      positions = positions.map((row) => [row[row.length - 1] + 1]);
      const past = this.presentNames.map((n) => out[n]);
      out = await this.run(plan, tokens.map((t) => [t]), full, positions, past, false, 1n);
    }
    return sequences;
  }

  /** The model's padding id when it is a token id (some configs say -1, some name none), else null. */
  modelPadId() {
    const pad = this.manifest.pad_token_id;
    return Number.isInteger(pad) && pad >= 0 && pad < this.manifest.vocab_size ? pad : null;
  }

  /** The model's padding id, else the first end-of-sequence id in the vocabulary (another never ends a row), else 0. */
  padIdOr(eos) {
    return this.modelPadId() ?? eos.find((e) => e >= 0 && e < this.manifest.vocab_size) ?? 0;
  }

  /** Refuses more positions than the model has; returns the positions left (null: no limit). */
  checkLength(plan, length, newTokens, maxLength = null) {  // maxLength: the call's, which new tokens came from
    const limit = this.manifest.max_positions;
    const virtual = plan.nPast + plan.nPrepend + plan.nInside;
    const total = length + virtual + newTokens;
    if (limit && total > limit) {  // a call's maxLength alone: the prompt's length cancels out (Python's length_words)
      throw new EdgePeftError(`prompt of ${length} tokens + the adapter's ${virtual} virtual tokens` +
        `${newTokens ? ` + ${newTokens} new tokens fed back` : ""} = ${total} exceeds the model's ${limit} positions; ` +
        (maxLength != null ? `pass maxLength ${maxLength - total + limit} or less` : "shorten the prompt" +
        (newTokens ? " or lower maxNewTokens (the call's, else the model's generation_config.json)" : "")));
    }
    return limit ? limit - total : null;
  }

  /** The prefill's mask and positions with the adapter's virtual tokens, as the Python runtime makes them. */
  virtualInputs(plan, mask, generate) {
    const n = plan.nPast + plan.nPrepend;
    const full = mask.map((row) => [...Array(n).fill(1), ...row]);
    if (!this.cache) return { full, positions: null };
    if (generate && !plan.nPrepend) {
      const positions = mask.map((row) => {
        let count = -1;
        return row.map((m) => { count += m; return m ? count + plan.nPast : 1 + plan.nPast; });
      });
      return { full, positions };
    }
    const length = mask[0].length + plan.nPrepend;
    return { full, positions: mask.map(() => Array.from({ length }, (_, i) => plan.nPast + i)) };
  }

  /** One graph run: the call's inputs, the adapter's tensors, the neutral value of every other slot. */
  async run(plan, ids, mask, positions, past, prefill, keep = 0n, types = null) {
    const { Tensor } = this.ort;
    const batch = ids.length;
    if (this.rowsApart && batch > 1 && ids[0].length > 1 && (past || Object.keys(plan.past).length)) {
      // GroupQueryAttention ("ops": "contrib") takes one row when several new tokens meet a non-empty cache
      // (a prefix's prefill): row by row, the outputs joined along the batch, as the Python runtime does
      const rows = [];
      for (let b = 0; b < batch; b++) {
        const rowPast = past && past.map((t) => rowOf(Tensor, t, b));
        rows.push(await this.run(plan, [ids[b]], [mask[b]], [positions[b]], rowPast, prefill, keep, types && [types[b]]));
      }
      return Object.fromEntries(Object.keys(rows[0]).map((name) => [name, joined(Tensor, rows.map((r) => r[name]))]));
    }
    // kept between calls: onnxruntime-web's proxy worker takes the buffers it is fed, so those go as copies there
    const kept = this.ort.env?.wasm?.proxy ? (t) => new Tensor(t.type, t.data.slice(), t.dims) : (t) => t;
    const feeds = {};
    for (const values of [this.neutral, plan.every, prefill ? plan.prefill : {}]) {
      for (const [name, t] of Object.entries(values)) feeds[name] = kept(t);
    }
    feeds.input_ids = new Tensor("int64", int64(ids), [batch, ids[0].length]);
    feeds.attention_mask = new Tensor("int64", int64(mask), [batch, mask[0].length]);
    if (this.typeVocabSize !== null) {  // a seq-cls BERT's: zeros where the call gives none
      feeds[TOKEN_TYPES] = new Tensor("int64", types ? int64(types) : new BigInt64Array(batch * ids[0].length), [batch, ids[0].length]);
    }
    if ("logits_to_keep" in feeds) feeds.logits_to_keep = new Tensor("int64", BigInt64Array.from([keep]), []);
    if (this.cache) {
      feeds.position_ids = new Tensor("int64", int64(positions), [batch, positions[0].length]);
      const { num_kv_heads: heads, head_dim: dim } = this.cache;
      this.pastNames.forEach((name, i) => {
        if (past) feeds[name] = past[i];
        else if (plan.past[name]) feeds[name] = repeat(Tensor, plan.past[name], batch);
        else feeds[name] = new Tensor("float32", new Float32Array(0), [batch, heads, 0, dim]);
      });
    }
    return this.session.run(feeds);
  }
}
