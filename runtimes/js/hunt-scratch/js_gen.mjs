import { readFileSync, writeFileSync } from "node:fs";
import * as ort from "onnxruntime-node";
import { openFolder } from "../src/node.js";
const [casesFile = "/tmp/hunt/js/cases.json", root = "/work/main/build/js", outFile = "/tmp/hunt/js/js_gen.json"] = process.argv.slice(2);
const cases = JSON.parse(readFileSync(casesFile, "utf8"));
const camel = (k) => k.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const rts = {};
const out = [];
for (const c of cases) {
  if (!rts[c.fixture]) {
    const rt = await openFolder(ort, `${root}/${c.fixture}`);
    const { readdirSync } = await import("node:fs");
    for (const a of readdirSync(`${root}/${c.fixture}/adapters`, { withFileTypes: true }).filter((d) => d.isDirectory())) await rt.loadAdapter(a.name);
    rts[c.fixture] = rt;
  }
  const s = Object.fromEntries(Object.entries(c.settings).map(([k, v]) => [k === "eos_token_id" ? "eosTokenId" : camel(k), v]));
  if (c.adapter) s.adapter = c.adapter;
  try {
    out.push({ ok: await rts[c.fixture].generate(c.ids, c.mask, s) });
  } catch (e) {
    out.push({ err: `${e.name}: ${e.message}` });
  }
}
writeFileSync(outFile, JSON.stringify(out));
