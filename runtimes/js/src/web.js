// Browsers: open an export served over HTTP with onnxruntime-web.
import { Tokenizer } from "@huggingface/tokenizers";

import { EdgePeftError, Runtime } from "./runtime.js";
import { tokenizerOf } from "./tokenizer.js";

async function fetched(url, as) {
  const response = await fetch(url);
  if (!response.ok) {
    const error = new EdgePeftError(`${url}: HTTP ${response.status}; serve the export's folder (OUT) at that address`);
    error.missing = response.status === 404;  // the runtime says what a missing file of an export means
    throw error;
  }
  return as === "json" ? response.json() : new Uint8Array(await response.arrayBuffer());
}

/** Files of the export at URL ``out`` (e.g. "/demo-out/export"). */
export function urlLoader(out) {
  const at = (rel) => `${out.replace(/\/$/, "")}/${rel}`;
  return {
    where: at,
    json: (rel) => fetched(at(rel), "json"),
    bytes: (rel) => fetched(at(rel)),
    session: async (ort, rel, options, external) => {
      const model = await fetched(at(rel));
      if (!external) return ort.InferenceSession.create(model, options);
      const base = at(rel).replace(/[^/]*$/, "");
      return ort.InferenceSession.create(model, { ...options, externalData: [{ path: "model.onnx.data", data: `${base}model.onnx.data` }] });
    },
  };
}

export async function openUrl(ort, out, options = {}) {
  return Runtime.open(ort, urlLoader(out), options);
}

/** The tokenizer exported with the base, fetched from URL ``out``. */
export async function loadTokenizer(out) {
  return tokenizerOf(Tokenizer, urlLoader(out));
}
