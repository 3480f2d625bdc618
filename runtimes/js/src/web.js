// Browsers: open an export served over HTTP with onnxruntime-web.
import { Tokenizer } from "@huggingface/tokenizers";

import { JSON_MOST, described, jsonMost, pastMost } from "./checks.js";
import { EdgePeftError, Runtime } from "./runtime.js";
import { createSession } from "./sessions.js";
import { tokenizerOf } from "./tokenizer.js";

/** `url` as a message prints it: without its query and fragment (a signed URL's token, ?X-Amz-Signature=..., went into
 * logs and bug reports), nor a user name and password (which fetch refuses); the request keeps the query. */
function shown(url) {
  try {
    const bare = new URL(url);
    [bare.search, bare.hash, bare.username, bare.password] = ["", "", "", ""];
    return bare.href;
  } catch {
    return String(url).replace(/[?#][\s\S]*$/, "");  // no URL: its text, cut where a query would start
  }
}

/** What Content-Length tells of the body of `response`: `exact`, its length, where that is the body's own (not
 * content-encoded: fetch decodes such a body, whose Content-Length is the encoded one's; and this site's answer, as
 * another site's hides its Content-Encoding), else null; `least`, the length it has at least (an encoding adds a few
 * bytes a block to what it cannot compress; 0 where no length is told). */
function declaredLength(response) {
  const length = response.headers.get("content-length") ?? "", coding = response.headers.get("content-encoding");
  if (!/^\d+$/.test(length)) return { exact: null, least: 0 };
  const exact = (!coding || /^\s*identity\s*$/i.test(coding)) && response.type !== "cors" ? Number(length) : null;
  return { exact, least: exact ?? (Number(length) - 2 ** 16) / 1.01 };
}

/** The body of `response` as `bytes`; where it is past `most` bytes (undefined: no limit), `over` (its length, else
 * Infinity) and `head` (its first bytes where the server calls it an HTML page): refused unread where Content-Length
 * tells (a 10 GB file was downloaded whole, then refused by its size), else read no further than one chunk past `most`. */
async function bodyOf(response, most) {
  const { exact, least } = declaredLength(response);
  if (most === undefined || exact !== null && exact <= most || !response.body) return { bytes: new Uint8Array(await response.arrayBuffer()) };
  const reader = response.body.getReader(), chunks = [];
  const over = async (n) => {  // the rest is never downloaded
    if (!chunks.length && /text\/html/i.test(response.headers.get("content-type") ?? "")) chunks.push((await reader.read()).value);
    reader.cancel().catch(() => {});
    return { over: n, head: chunks[0] ?? new Uint8Array() };
  };
  if (least > most) return over(exact ?? Infinity);
  let total = 0;
  for (let part = await reader.read(); !part.done; part = await reader.read()) {
    chunks.push(part.value);
    if ((total += part.value.length) > most) return over(Infinity);
  }
  const bytes = new Uint8Array(total);
  chunks.reduce((at, chunk) => (bytes.set(chunk, at), at + chunk.length), 0);
  return { bytes };
}

/** The body of `url` (JSON or bytes; bytes past `most`, where given, an error marked `over`: bodyOf); a failed
 * download, an HTTP error or a page where an export's file should be named. */
async function fetched(url, as, most) {
  let response, body, over;
  try {
    // every file revalidated on every fetch (unchanged: a 304, no download): a browser's cached edgepeft.json paired
    // an old manifest with re-exported files, and a cached adapter.onnx or model.onnx.data (a site's max-age) an old
    // graph or weights with a re-exported manifest (a checksum that re-exporting could not mend; other logits)
    response = await fetch(url, { cache: "no-cache" });
    if (response.ok) {  // a manifest past JSON_MOST is not downloaded whole, as a folder's is refused unread
      const read = await bodyOf(response, as === "json" ? jsonMost(new URL(url).pathname) : most);
      [body, over] = [read.bytes ?? read.head, read.over];
      if (as === "json") body = new TextDecoder().decode(body);  // as response.text(): UTF-8, a byte-order mark dropped
    }
  } catch (e) {  // the server down, the connection cut: nothing to re-export; a browser refuses another site's answer
    // (CORS) alike, where no retry helps
    // (an error naming the address, as Deno's, names it without its query); an address of this site may redirect to
    // another (a CDN), which the browser hides: told so too (a web hunt)
    const page = globalThis.location?.origin, other = page && page !== "null" && new URL(url).origin !== page;
    const site = other ? "another site's server" : "where the address redirects to another site (a CDN), that site";
    throw new EdgePeftError(`${shown(url)}: download failed (${String(e.message).split(url).join(shown(url))}); check the server and the connection, then retry` +
      (page && page !== "null" ? `; ${site} must allow this page's origin (Access-Control-Allow-Origin: ${page}) on ` +
        "every answer, errors included, or serve the export from this page's site" : ""));
  }
  // a site that answers a missing file with its HTML page (a binary file's said "checksum does not match: re-export"):
  // a text starting "<", and for a binary file (whose first byte may be "<") a page's content type too (the file
  // itself served as text/html was named missing)
  const head = as === "json" ? body ?? "" : new TextDecoder().decode((body ?? new Uint8Array()).subarray(0, 64));
  const page = response.ok && /^\uFEFF?\s*</.test(head) &&
    (as === "json" || /text\/html/i.test(response.headers?.get?.("content-type") ?? ""));
  if (!response.ok || page) {
    const error = new EdgePeftError(`${shown(url)}: ${page ? "the server answered with an HTML page, not the export's file"
      : `HTTP ${response.status}`}; ${response.status >= 500 ? "the server failed: check it, then retry"
      : [401, 403].includes(response.status) ? "the server refused this page the file: check its access rules, or sign " +
        "the address again where it was signed (expired)" : "serve the export's folder (OUT) at that address"}`);
    error.missing = page || response.status === 404;  // the runtime says what a missing file of an export means
    throw error;
  }
  if (over !== undefined && as === "json") {  // readJson names the file: "not readable JSON (...)", as a folder's
    throw new Error(`${over === Infinity ? `past ${JSON_MOST}` : over} bytes, more than any edgepeft reads (${JSON_MOST})`);
  }
  if (over !== undefined) throw Object.assign(new Error(`${shown(url)}: past ${most} bytes`), { over });
  return as === "json" ? JSON.parse(body) : body;
}

/** Files of the export at URL ``out`` (e.g. "/demo-out/export", "https://host/out?v=2"), resolved once against the
 * page: a relative OUT under onnxruntime-web's proxy worker was resolved against the worker's script. */
export function urlLoader(out) {
  let root;
  if (!((typeof out === "string" && out) || out instanceof URL)) {  // undefined was fetched as <page>/undefined/base/...
    throw new EdgePeftError(`openUrl and loadTokenizer take an export's address (a URL, or a path of this site), got ${described(out)}`);
  }
  try {
    root = new URL(out, globalThis.location?.href);
  } catch {
    throw new EdgePeftError(`${shown(out)}: not a URL this page can fetch; give the export's address (absolute, or a path of this site)`);
  }
  if (root.username || root.password) {  // fetch refuses the address ("download failed ...; check the server")
    throw new EdgePeftError(`${shown(out)}: holds a user name or password, which fetch does not send; give the address ` +
      "without them (a signed URL's query, or a server that lets this page in, e.g. by its cookie)");
  }
  const at = (rel) => {
    const url = new URL(root);
    // each name encoded: the pathname setter leaves "%" as it is, so a folder named p%20q was fetched as "p q"
    const path = rel.split("/").map(encodeURIComponent).join("/");
    url.pathname = `${root.pathname.replace(/\/*$/, "")}/${path}`;  // its query (?v=2) kept for every file
    url.hash = "";
    return url.href;
  };
  const downloads = new Map();  // base files fetched for their size (file_bytes) and then for their session, once
  const once = (rel, most) => {
    if (!downloads.has(rel)) downloads.set(rel, fetched(at(rel), "bytes", most));
    return downloads.get(rel);
  };
  return {
    where: (rel) => shown(at(rel)),  // messages' addresses; at(rel) is fetched
    json: (rel) => fetched(at(rel), "json").catch(async (e) => {
      throw e.missing && rel === "base/edgepeft.json" && await partOf(at) || e;  // the base or an adapter's address
    }),
    bytes: (rel, most) => fetched(at(rel), "bytes", most).catch((e) => { throw e.over ? pastMost(shown(at(rel)), most) : e; }),
    // a base file's size as served (undefined: missing; checkSizes names it): a stale model.onnx.data gave other logits;
    // one past the size the export wrote (`want`) is not downloaded whole (Infinity where its length is not told)
    size: (rel, want) => once(rel, want).then((bytes) => bytes.length, (e) => {
      if (e.missing) return undefined;
      if (e.over) return e.over;
      throw e;
    }),
    session: async (ort, rel, options, external) => {
      const data = `${rel.replace(/[^/]*$/, "")}model.onnx.data`;
      try {
        const model = await once(rel);
        if (!external) return await createSession(ort, model, options);
        return await createSession(ort, model, { ...options, externalData: [{ path: "model.onnx.data", data: await once(data) }] });
      } finally {
        downloads.delete(rel);  // the session holds what it needs
        downloads.delete(data);
      }
    },
  };
}

/** An export's part the address ``at("")`` names (its base folder, one adapter's), as openFolder and the Python runtime
 * name one: an EdgePeftError saying what to open, else null ("HTTP 404; serve OUT at that address" stands). */
async function partOf(at) {
  const here = shown(at("")).replace(/\/$/, "");  // its query (?v=2) left out of the addresses named
  const up = (address, n) => address.replace(new RegExp(`(/[^/]*){${n}}$`), "");
  const has = (rel) => fetched(at(rel), "json").then(() => true, () => false);
  if (await has("adapter.json")) {
    const name = decodeURIComponent(new URL(here).pathname.split("/").pop());
    return new EdgePeftError(`${here}: is one adapter of the export ${up(here, 2)}; open ${up(here, 2)} and pick adapter '${name}'`);
  }
  return await has("edgepeft.json") ? new EdgePeftError(`${here}: is the base folder of the export ${up(here, 1)}; open ` +
    `${up(here, 1)} itself`) : null;
}

export async function openUrl(ort, out, options = {}) {
  return Runtime.open(ort, urlLoader(out), options);
}

/** The tokenizer exported with the base, fetched from URL ``out``. */
export async function loadTokenizer(out) {
  return tokenizerOf(Tokenizer, urlLoader(out));
}
