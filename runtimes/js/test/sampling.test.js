// generate's settings, as the Python runtime applies them (tests/test_js_fixtures.py writes its answers): the
// scores a token is picked from for each setting, the model's generation_config.json settings where a call leaves
// them unset, seeded sampling from those scores, and the refusals.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

import * as ortNode from "onnxruntime-node";

import { EdgePeftError } from "../src/runtime.js";
import { openFolder } from "../src/node.js";
import { forPrompt, generationSettings, generator, pick, processScores } from "../src/sampling.js";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const FIXTURES = process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js");
const expected = JSON.parse(await readFile(path.join(FIXTURES, "expected.json"), "utf8"));

const camel = (key) => key.replace(/_([a-z])/g, (_, c) => c.toUpperCase());
const settingsOf = (c) => forPrompt(generationSettings({}, Object.fromEntries(
  Object.entries(c.settings).map(([k, v]) => [camel(k), v]))), c.prompt_length);

test("the scores a token is picked from are the Python runtime's, setting by setting", () => {
  for (const c of expected.processing) {
    const got = processScores(c.logits, c.row, settingsOf(c), c.padding, c.prompt_length, c.eos);
    c.scores.forEach((want, v) => {
      if (want === null) assert.equal(got[v], -Infinity, `${JSON.stringify(c.settings)}: token ${v} removed`);
      else assert.ok(Math.abs(got[v] - want) <= 1e-5 * Math.max(1, Math.abs(want)), `${JSON.stringify(c.settings)}: ${v}`);
    });
    assert.ok(c.scores.some((x) => x === null), "each setting removes tokens");
  }
});

test("sampling draws from those scores' softmax, repeats with a seed, and never a removed token", () => {
  let seeded = 0;
  for (const c of expected.processing.filter((x) => x.settings.do_sample)) {
    const s = settingsOf(c);
    const scores = processScores(c.logits, c.row, s, c.padding, c.prompt_length, c.eos);
    const draws = 20000, counts = new Array(scores.length).fill(0);
    const random = generator(3);
    for (let i = 0; i < draws; i++) counts[pick(scores, s, random)]++;
    const max = Math.max(...c.scores.filter((x) => x !== null));
    const e = c.scores.map((x) => (x === null ? 0 : Math.exp(x - max)));
    const sum = e.reduce((a, b) => a + b, 0);
    e.forEach((p, v) => {
      if (p === 0) assert.equal(counts[v], 0, `removed token ${v} drawn`);
      assert.ok(Math.abs(counts[v] / draws - p / sum) < 0.015, `token ${v}: ${counts[v] / draws} vs ${p / sum}`);
    });
    const again = (seed) => { const r = generator(seed); return Array.from({ length: 20 }, () => pick(scores, s, r)); };
    assert.deepEqual(again(5), again(5));
    assert.notDeepEqual(generator(1)(), generator(2 ** 32 + 1)());  // the seed's high bits count (Date.now() 49 days apart)
    if (counts.filter((n) => n > draws / 10).length > 1) {  // two likely tokens: another seed, other draws
      assert.notDeepEqual(again(5), again(6));
      seeded++;
    }
  }
  assert.ok(seeded > 0);
});

test("topP keeps as many tokens as transformers where a float32 sum drifts (ten equal ones: 0.8000000715 at the eighth)", () => {
  const s = { doSample: true, temperature: 1, topK: 0, topP: 0.2, minP: null, repetitionPenalty: 1, noRepeatNgramSize: 0 };
  for (const topP of [0.2, 0.3, 0.7, 0.9]) {  // transformers' TopPLogitsWarper keeps 10 * topP of ten equal scores
    const kept = processScores(new Float32Array(10), [5], { ...s, topP }, 0, 1, []).filter((x) => x > -Infinity).length;
    assert.equal(kept, Math.round(10 * topP), `topP ${topP}`);
  }
});

test("a vocabulary of 152k tokens samples with minP (Math.max(...) overflowed the stack past about 128k)", () => {
  const logits = Float32Array.from({ length: 151936 }, (_, v) => 10 * Math.sin(v));
  const s = forPrompt(generationSettings({}, { doSample: true, minP: 0.05, topK: 0, seed: 1 }), 3);
  const scores = processScores(logits, [1, 2, 3], s, 0, 3, [2]);
  const token = pick(scores, s, generator(1));
  // kept: probability >= 0.05 x the largest, i.e. 10 sin(v) >= 10 + ln 0.05
  assert.ok(10 * Math.sin(token) >= 10 + Math.log(0.05) - 1e-4, `token ${token}`);
  assert.ok(scores.some((x) => x === -Infinity) && scores.some((x) => x > 0));
});

test("the model's generation_config.json settings apply where a call leaves them unset, as in Python", async () => {
  const rt = await openFolder(ortNode, path.join(FIXTURES, "llama"));
  await rt.loadAdapter("lora");
  const { ids, mask } = expected.llama;
  const want = expected.settings_greedy;
  const plain = await rt.generate(ids, mask, { adapter: "lora", maxNewTokens: 6, eosTokenId: want.eos });
  rt.manifest.generation = want.generation;  // as an export of a model whose generation_config.json sets them
  const got = await rt.generate(ids, mask, { adapter: "lora", maxNewTokens: 6, eosTokenId: want.eos });
  assert.deepEqual(got, want.ids);
  assert.notDeepEqual(got, plain);  // the settings changed the tokens
  // sampling with top-k 1 is greedy; a seed repeats the draws
  const one = { adapter: "lora", maxNewTokens: 6, eosTokenId: [], doSample: true, topK: 1, seed: 1 };
  assert.deepEqual(await rt.generate(ids, mask, one), await rt.generate(ids, mask, { ...one, doSample: false }));
  const sampled = { adapter: "lora", maxNewTokens: 6, eosTokenId: [], doSample: true, temperature: 2, seed: 9 };
  assert.deepEqual(await rt.generate(ids, mask, sampled), await rt.generate(ids, mask, sampled));
  rt.manifest.generation = { seed: 9 };  // a hunt: a manifest's seed was ignored here (Python applies it)
  const { seed, ...unseeded } = sampled;
  assert.deepEqual(await rt.generate(ids, mask, unseeded), await rt.generate(ids, mask, sampled));
  rt.manifest.generation = expected.model_ids.generation;  // end and padding ids apart from config.json's: Python's ids
  assert.deepEqual(await rt.generate(ids, mask, { adapter: "lora", maxNewTokens: 6 }), expected.model_ids.ids);
  rt.manifest.generation = { max_length: ids[0].length + 2 };  // a model that sets max_length only
  assert.equal((await rt.generate(ids, mask, { adapter: "lora", eosTokenId: [] }))[0].length, ids[0].length + 2);
  // a hunt: a model's max_length of its context (Llama-2's) refused every prefix adapter's default call, "shorten the
  // prompt" (which never fits): as the default 32, it gives the room the virtual tokens leave; the call's is refused
  rt.manifest.generation = { max_length: rt.manifest.max_positions };
  await rt.loadAdapter("prefix");
  const room = rt.manifest.max_positions - ids[0].length - rt.plan("prefix").nPast;
  assert.deepEqual(await rt.generate(ids, mask, { adapter: "prefix", eosTokenId: [] }),
    await rt.generate(ids, mask, { adapter: "prefix", eosTokenId: [], maxNewTokens: room }));
  const fits = rt.manifest.max_positions - 1;  // a jsparity hunt: "lower maxNewTokens", which the call never gave
  await assert.rejects(rt.generate(ids, mask, { adapter: "prefix", maxLength: rt.manifest.max_positions }),
    new RegExp(`exceeds the model's \\d+ positions; pass maxLength ${fits} or less$`));
  await rt.generate(ids, mask, { adapter: "prefix", maxLength: fits, eosTokenId: [] });  // as it says
  const refuses = (options, pattern) => assert.rejects(rt.generate(ids, mask, { adapter: "lora", ...options }),
    (e) => e instanceof EdgePeftError && pattern.test(e.message));
  await refuses({ maxLength: ids[0].length }, /maxLength \d+ .* leaves no new token after a \d+-token prompt; pass maxNewTokens/);
  await refuses({ doSample: true, temperature: 0 }, /temperature must be > 0 when sampling/);
  await refuses({ doSample: true, topP: 1.5 }, /topP must be in \[0, 1\]/);
  await refuses({ noRepeatNgramSize: -1 }, /noRepeatNgramSize must be an integer >= 0/);
  // topK as Python checks top_k: a whole number always, >= 0 when sampling (greedy decoding ignores it)
  await refuses({ doSample: true, topK: -1 }, /topK must be >= 0 \(0: off\), got -1/);
  await refuses({ topK: 1.5 }, /topK must be an integer, got 1.5/);
  assert.deepEqual(await rt.generate(ids, mask, { adapter: "lora", maxNewTokens: 6, eosTokenId: want.eos, topK: -1 }), plain);
  await refuses({ top_k: 5 }, /generate has no option top_k; .* \(topK: camelCase here\)/);
  await refuses({ stop: ["x"] }, /has no option stop; .*stop strings .* are the Python runtime's only/);
});
