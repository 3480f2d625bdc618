// Every JavaScript block of docs/web.md runs as written (in Node, on the exports tests/test_js_fixtures.py
// writes), in a folder where OUT-cls is the MiniLM classifier export and OUT the tiny Llama one.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const REPO = path.resolve(PACKAGE, "../..");
const FIXTURES = path.resolve(process.env.EDGEPEFT_JS_FIXTURES || path.join(REPO, "build", "js"));

test("docs/web.md: every JavaScript block runs", async () => {
  const page = await readFile(path.join(REPO, "docs", "web.md"), "utf8");
  const blocks = [...page.matchAll(/^```js\n([\s\S]*?)^```/gm)].map((m) => m[1]);
  assert.ok(blocks.length > 0);
  const folder = await mkdtemp(path.join(os.tmpdir(), "edgepeft-docs-"));
  await symlink(path.join(FIXTURES, "minilm"), path.join(folder, "OUT-cls"));
  await symlink(path.join(FIXTURES, "llama"), path.join(folder, "OUT"));
  try {
    for (const [i, block] of blocks.entries()) {
      // inside the package, so that "@edgepeft/runtime" resolves to it (self-reference) and ONNX Runtime to its deps
      const script = path.join(PACKAGE, `.docs-block-${process.pid}-${i}.mjs`);
      await writeFile(script, block);
      try {
        const { stdout } = await promisify(execFile)(process.execPath, [script], { cwd: folder });
        assert.match(stdout, /intent \{ label: '[a-z_]+', score: /, `block ${i} printed:\n${stdout}`);
      } finally {
        await rm(script);
      }
    }
  } finally {
    await rm(folder, { recursive: true });
  }
});
