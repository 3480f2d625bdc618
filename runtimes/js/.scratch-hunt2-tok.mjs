import { readFileSync } from "node:fs";
import { loadTokenizer } from "./src/node.js";
const root = "/tmp/pairs_hunt2/tok";
const exp = JSON.parse(readFileSync(`${root}/expected.json`, "utf8"));
let bad = 0;
for (const [name, rows] of Object.entries(exp.cases)) {
  let tok;
  try { tok = await loadTokenizer(`${root}/${name}`); } catch (e) { console.log(name, "LOAD REFUSED:", e.message.slice(0, 200), "| python:", rows.error ?? "ok"); continue; }
  exp.pairs.forEach(([a, b], i) => {
    const want = rows[i];
    let got;
    try { const r = tok.encode(a, b === null ? { return_token_type_ids: true } : { text_pair: b }); got = [r.ids, r.token_type_ids]; }
    catch (e) { got = { error: e.message }; }
    const same = JSON.stringify(got) === JSON.stringify(want);
    if (!same && !(got.error && want.error)) {
      bad++;
      console.log(`MISMATCH ${name} #${i} ${JSON.stringify([a, b]).slice(0, 80)}\n  py: ${JSON.stringify(want).slice(0, 400)}\n  js: ${JSON.stringify(got).slice(0, 400)}`);
    }
  });
}
console.log("mismatches", bad);
