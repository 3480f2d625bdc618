// The browser loader (src/web.js) against a local server that behaves as real hosting does: an OUT address with a
// query string (cache busting), a stale weights file of another length (other logits, no error), a site that answers
// a missing file with its HTML page, and a server that is down. Run with onnxruntime-web's wasm, in Node.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import { after, test } from "node:test";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

import * as ortWeb from "onnxruntime-web";

import { EdgePeftError } from "../src/runtime.js";
import { openFolder } from "../src/node.js";
import { loadTokenizer, openUrl } from "../src/web.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
ortWeb.env.wasm.numThreads = 1;
const refuses = (call, pattern) => assert.rejects(call, (e) => e instanceof EdgePeftError && pattern.test(e.message));

// copies: {folder name: the adapter it holds}; gone: files answered as missing
// large: a file answered with `length` zeros ({ rel, length, told, sent }): told, its Content-Length sent and the body
// cut after one chunk (a client that waits for the body fails); else sent as the client reads, counted in `sent`
const behaviour = { staleData: false, pages: false, copies: {}, gone: new Set(), failing: null, asHtml: false, cut: null,
  large: null, stored: null, foreign: null, waiting: false, catchAll: null, padded: null };
const server = http.createServer(async (request, response) => {
  let rel = decodeURIComponent(new URL(request.url, "http://x").pathname).replace(/^\/out\//, "");
  const [dir, name, ...file] = rel.split("/");
  if (dir === "adapters" && name in behaviour.copies) rel = ["adapters", behaviour.copies[name], ...file].join("/");
  if (behaviour.waiting) rel = rel.replace(/\/\.adapter\.json\.new$/, "/adapter.json");  // re-pointed, as export writes it
  behaviour.queries?.push(new URL(request.url, "http://x").search);
  if (behaviour.large?.rel === rel) return large(response, behaviour.large);
  try {
    if (behaviour.gone.has(rel)) throw new Error("gone");
    if (behaviour.failing && rel.endsWith(behaviour.failing)) return response.writeHead(503).end();
    if (behaviour.forbidden && rel.endsWith(behaviour.forbidden)) return response.writeHead(403).end();
    let body = await readFile(path.join(FIXTURES, "llama", rel));
    if (behaviour.staleData && rel.endsWith("model.onnx.data")) body = Buffer.concat([body, Buffer.alloc(64)]);
    if (behaviour.padded === rel) body = Buffer.concat([body, Buffer.alloc(17 * 2 ** 20, " ")]);  // a large vocabulary's
    if (behaviour.cut && rel.endsWith(behaviour.cut)) body = body.subarray(0, body.length >> 1);  // a download cut short
    if (name === behaviour.foreign && file.join("/") === "adapter.json") {  // made for another base
      body = JSON.stringify({ ...JSON.parse(body), base_fingerprint: "0".repeat(64) });
    }
    if (behaviour.stored === rel) {  // gzip of stored blocks: its Content-Length is past the file's size, its body not
      body = gzipSync(body, { level: 0 });
      return response.writeHead(200, { "content-encoding": "gzip", "content-length": body.length }).end(body);
    }
    response.writeHead(200, behaviour.asHtml ? { "content-type": "text/html" } : {}).end(body);
  } catch {
    if (behaviour.catchAll !== null) response.writeHead(200).end(behaviour.catchAll);  // every path: 200
    else if (behaviour.pages) response.writeHead(200, { "content-type": "text/html" }).end("<!DOCTYPE html><p>app</p>");
    else response.writeHead(404).end();
  }
});

async function large(response, file) {
  const chunk = Buffer.alloc(2 ** 16);
  response.writeHead(200, file.told ? { "content-length": file.length } : {});
  if (file.told) return response.write(chunk, () => response.socket?.end());
  for (file.sent = 0; file.sent < file.length && !response.destroyed; file.sent += chunk.length) {
    if (!response.write(chunk)) await new Promise((resolve) => { response.once("drain", resolve); response.once("close", resolve); });
  }
  response.end();
}
await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
after(() => server.close());
const base = `http://127.0.0.1:${server.address().port}/out`;

test("an OUT address with a query string opens (files were fetched from 'out?v=2/base/...')", async () => {
  const ids = [[5, 6, 7]];
  const want = (await (await openFolder(ortWeb, path.join(FIXTURES, "llama"))).forward(ids)).logits.data;
  const rt = await openUrl(ortWeb, `${base}?v=2`);
  assert.deepEqual(Array.from((await rt.forward(ids)).logits.data), Array.from(want));
  assert.equal(await rt.loadAdapter("lora"), "lora");
});

test("adapter folders whose names hold %, #, ? or spaces are fetched by their names (p%20q was fetched as 'p q')", async () => {
  const ids = [[5, 6, 7]];
  const local = await openFolder(ortWeb, path.join(FIXTURES, "llama"));
  await local.loadAdapter("lora");
  const want = Array.from((await local.forward(ids, undefined, { adapter: "lora" })).logits.data);
  const rt = await openUrl(ortWeb, base);
  for (const name of ["p%20q", "100%", "a#b?c", "sp ace"]) {
    behaviour.copies[name] = "lora";
    assert.equal(await rt.loadAdapter(name), name);
    assert.deepEqual(Array.from((await rt.forward(ids, undefined, { adapter: name })).logits.data), want);
  }
  behaviour.copies = {};
});

test("a stale weights file, a page for a missing file, a server that is down: each named, none a wrong answer", async () => {
  behaviour.staleData = true;  // the weights were fetched by onnxruntime-web, unchecked: other logits, no error
  // (sent without its length: read no further than the size the export wrote, large.told below)
  await refuses(openUrl(ortWeb, base), /model\.onnx\.data: more than \d+ bytes where the export wrote \d+ \(a copy cut short\?\)/);
  behaviour.staleData = false;
  behaviour.cut = "neutral.onnx";  // a hunt: ONNX Runtime's protobuf error, "re-export"; once, blamed on sessionOptions
  await refuses(openUrl(ortWeb, base), /base\/neutral\.onnx: \d+ bytes where the export wrote \d+ \(a copy cut short\?\)/);
  behaviour.cut = null;
  const options = { executionProviders: ["wasm"] };  // onnxruntime-web wrote its own key into the app's object
  assert.deepEqual((await openUrl(ortWeb, base, { sessionOptions: options })).sessionOptions, options);
  assert.deepEqual(options, { executionProviders: ["wasm"] });
  behaviour.pages = true;  // "not readable JSON (Unexpected token '<')...; re-export it"
  const rt = await openUrl(ortWeb, base);
  await refuses(rt.loadAdapter("nope"), /adapters\/nope\/adapter\.json: no adapter nope in this export/);
  // a page for a missing binary file: its checksum "did not match: re-export it", which puts no file on the server
  behaviour.gone = new Set(["adapters/lora/adapter.onnx", "base/neutral.onnx"]);
  await refuses(rt.loadAdapter("lora"), /adapters\/lora\/adapter\.onnx: missing from the export/);
  await refuses(openUrl(ortWeb, base), /base\/neutral\.onnx: missing; copy the export's base folder again/);
  behaviour.gone = new Set();
  behaviour.pages = false;
  await refuses(openUrl(ortWeb, "http://127.0.0.1:9/out"), /edgepeft\.json: download failed \(.*\); check the server and the connection/);
  // found by a hunt: a server's error was told to serve OUT there, which it did; a file served as text/html, missing
  behaviour.failing = "model.onnx.data";
  await refuses(openUrl(ortWeb, base), /model\.onnx\.data: HTTP 503; the server failed: check it, then retry$/);
  behaviour.failing = null;
  behaviour.forbidden = "model.onnx.data";  // a web hunt: an expired signed address was told to serve OUT there
  await refuses(openUrl(ortWeb, base), /model\.onnx\.data: HTTP 403; the server refused this page the file: check its access rules/);
  behaviour.forbidden = null;
  behaviour.asHtml = true;
  assert.equal(await (await openUrl(ortWeb, base)).loadAdapter("lora"), "lora");
  behaviour.asHtml = false;
  await refuses(openUrl(ortWeb, "out"), /^out: not a URL this page can fetch/);  // relative, with no page to resolve it
  // a hunt: an address one level too deep was "HTTP 404; serve the export's folder (OUT) at that address"
  await refuses(openUrl(ortWeb, `${base}/base`), new RegExp(`^${base}/base: is the base folder of the export ${base}; open ${base} itself$`));
  await refuses(openUrl(ortWeb, `${base}/adapters/lora?v=2`), new RegExp(`^${base}/adapters/lora: is one adapter of the ` +
    `export ${base}; open ${base} and pick adapter 'lora'$`));
  globalThis.location = { origin: "http://page.example", href: "http://page.example/app/" };  // a page of another site
  try {  // a CORS refusal is the browser's "Failed to fetch", as a server that is down: the fix names both
    await refuses(openUrl(ortWeb, "http://127.0.0.1:9/out"), /download failed .*; another site's server must allow this page's origin \(Access-Control-Allow-Origin: http:\/\/page\.example\) on every answer/);
    // a web hunt: an address of this page's site redirecting to a CDN without CORS was told only to check the server
    globalThis.location = { origin: "http://127.0.0.1:9", href: "http://127.0.0.1:9/app/" };
    await refuses(openUrl(ortWeb, "http://127.0.0.1:9/out"), /download failed .*; where the address redirects to another site \(a CDN\), that site must allow this page's origin \(Access-Control-Allow-Origin: http:\/\/127\.0\.0\.1:9\)/);
  } finally {
    delete globalThis.location;
  }
});

test("a file past its size is refused by its Content-Length unread, else read no further than its size", async () => {
  // the whole file was downloaded, then refused by its size (a base file) or its checksum (an adapter.onnx past what an
  // adapter of the base can take, which a folder's is refused by, unread)
  const rt = await openUrl(ortWeb, base);
  rt.most = 2 ** 22;  // a smaller base's limit: less to send
  const adapter = `${base}/adapters/lora/adapter.onnx: more than an adapter of this base can take \\(${rt.most} bytes\\); re-export it under its folder's name`;
  const { file_bytes: { "model.onnx.data": want } } = JSON.parse(await readFile(path.join(FIXTURES, "llama/base/edgepeft.json"), "utf8"));
  const data = `${base}/base/model.onnx.data: `, wrote = ` bytes where the export wrote ${want} \\(a copy cut short\\?\\)`;
  try {
    for (const told of [true, false]) {
      behaviour.large = { rel: "adapters/lora/adapter.onnx", length: rt.most + 2 ** 24, told };
      await refuses(rt.loadAdapter("lora"), new RegExp(`^${adapter} \\(edgepeft export`));
      behaviour.large = { rel: "base/model.onnx.data", length: want + 2 ** 24, told };
      await refuses(openUrl(ortWeb, base), new RegExp(`^${data}${told ? want + 2 ** 24 : `more than ${want}`}${wrote}`));
      if (!told) assert.ok(behaviour.large.sent < behaviour.large.length, "the whole file was sent");
      behaviour.large = { rel: "adapters/lora/adapter.json", length: 2 ** 26, told };  // as a folder's: unread
      await refuses(rt.loadAdapter("lora"), new RegExp(`^${base}/adapters/lora/adapter\\.json: not readable JSON \\(` +
        `${told ? 2 ** 26 : "past 16777216"} bytes, more than any edgepeft reads \\(16777216\\)\\)`));
      if (!told) assert.ok(behaviour.large.sent < behaviour.large.length, "the whole manifest was sent");
    }
  } finally {
    behaviour.large = null;
  }
  assert.equal(await rt.loadAdapter("lora"), "lora");
  behaviour.stored = "base/model.onnx.data";  // an encoded body's Content-Length is not its size: opened
  try {
    assert.ok((await openUrl(ortWeb, base)).manifest);
  } finally {
    behaviour.stored = null;
  }
});

test("a tokenizer.json past 16 MiB (a large vocabulary's) is read whole, as Python's tokenizers reads it", async () => {
  const ids = (await loadTokenizer(base)).encode("w10 w20 w30").ids;
  behaviour.padded = "base/tokenizer.json";
  try {
    assert.deepEqual((await loadTokenizer(base)).encode("w10 w20 w30").ids, ids);
  } finally {
    behaviour.padded = null;
  }
});

test("a message prints no address's query or fragment (a signed URL's token); every request keeps the query", async () => {
  const signed = "?X-Amz-Signature=secret&token=secret#secret", fetched = behaviour.queries = [];
  const quiet = (call, pattern) => assert.rejects(call, (e) => e instanceof EdgePeftError && pattern.test(e.message) &&
    !/secret|\?/.test(e.message.replace(/\(a copy cut short\?\)/, "")));
  try {
    const rt = await openUrl(ortWeb, `${base}${signed}`);
    await quiet(rt.loadAdapter("nope"), new RegExp(`^${base}/adapters/nope/adapter\\.json: no adapter nope in this export`));
    behaviour.large = { rel: "adapters/lora/adapter.onnx", length: 2 * rt.most, told: true };
    await quiet(rt.loadAdapter("lora"), new RegExp(`^${base}/adapters/lora/adapter\\.onnx: more than an adapter`));
    behaviour.large = null;
    behaviour.staleData = true;
    await quiet(openUrl(ortWeb, `${base}${signed}`), new RegExp(`^${base}/base/model\\.onnx\\.data: more than \\d+ bytes where`));
    behaviour.staleData = false;
    behaviour.failing = "neutral.onnx";
    await quiet(openUrl(ortWeb, `${base}${signed}`), new RegExp(`^${base}/base/neutral\\.onnx: HTTP 503; the server failed`));
    behaviour.failing = null;
    behaviour.pages = true;
    await quiet(openUrl(ortWeb, `${base}/nothing${signed}`), new RegExp(`^${base}/nothing/base/edgepeft\\.json: the server answered with an HTML page`));
    behaviour.pages = false;
    await quiet(openUrl(ortWeb, `${base}/nothing${signed}`), new RegExp(`^${base}/nothing/base/edgepeft\\.json: HTTP 404; serve`));
    await quiet(openUrl(ortWeb, `${base}/base${signed}`), new RegExp(`^${base}/base: is the base folder of the export ${base}; open ${base} itself$`));
    await quiet(openUrl(ortWeb, `http://127.0.0.1:9/out${signed}`), /^http:\/\/127\.0\.0\.1:9\/out\/base\/edgepeft\.json: download failed/);
    await quiet(openUrl(ortWeb, `out${signed}`), /^out: not a URL this page can fetch/);
    await quiet(openUrl(ortWeb, "http://user:secret@127.0.0.1:9/out"), /^http:\/\/127\.0\.0\.1:9\/out: holds a user name or password, which fetch does not send/);
    behaviour.gone = new Set(["base/tokenizer.json"]);  // the tokenizer's messages name files alike
    await quiet(loadTokenizer(`${base}${signed}`), new RegExp(`^${base}/base/tokenizer\\.json: missing`));
  } finally {
    Object.assign(behaviour, { large: null, staleData: false, failing: null, pages: false, gone: new Set(), queries: null });
  }
  assert.ok(fetched.length > 10 && fetched.every((q) => q === "?X-Amz-Signature=secret&token=secret"), fetched.join(" "));
});

test("a server answering every path with 200 is not read as a stopped export's manifest waiting beside an adapter", async () => {
  // "an export into OUT was stopped before it re-pointed it; run that export again", of an export no one ran
  const rt = await openUrl(ortWeb, base);
  const folder = `${base}/adapters/other`, removed = `made for another base \\(.*\\); remove ${folder}, or re-export`;
  Object.assign(behaviour, { copies: { other: "lora" }, foreign: "other" });
  try {
    for (const body of ["no such file", '{"error": "not found"}', "{}"]) {
      behaviour.catchAll = body;
      await refuses(rt.loadAdapter("other"), new RegExp(`^${folder}: ${removed}`));
    }
    behaviour.catchAll = null;
    behaviour.waiting = true;  // the manifest re-pointed to this base is there: that export is named
    await refuses(rt.loadAdapter("other"), new RegExp(`^${folder}: made for another base .*; an export into OUT was ` +
      "stopped before it re-pointed it; run that export again"));
  } finally {
    Object.assign(behaviour, { copies: {}, foreign: null, waiting: false, catchAll: null });
  }
});

test("every file is revalidated on every fetch (a browser's cached edgepeft.json hid a base re-exported since)", async () => {
  const real = globalThis.fetch;
  const modes = {};
  globalThis.fetch = (url, init) => { modes[new URL(url).pathname.replace(/^\/out\//, "")] = init?.cache; return real(url, init); };
  try {
    const rt = await openUrl(ortWeb, base);
    await rt.loadAdapter("lora");
  } finally {
    globalThis.fetch = real;
  }
  // every file: a cached adapter.onnx or model.onnx.data (a site's max-age) paired an old graph or weights with a
  // re-exported manifest (a checksum no re-export could mend; a same-size base's other logits, silently)
  for (const file of ["base/edgepeft.json", "adapters/lora/adapter.json", "base/model.web.onnx", "base/model.onnx.data",
    "base/neutral.onnx", "adapters/lora/adapter.onnx"]) assert.equal(modes[file], "no-cache", file);
});
