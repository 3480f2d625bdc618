"""docs/deploy.md's Python blocks run as written on a device install (this environment: no torch), against the
exports the main suite wrote: OUT is the tiny Llama export, OUT-cls the MiniLM classifier."""
from __future__ import annotations

import contextlib
import io
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("EDGEPEFT_DEVICE_FIXTURES", os.path.join(REPO, "build", "device"))


def test_deploy_page_runs_as_written(tmp_path, monkeypatch):
    with open(os.path.join(REPO, "docs", "deploy.md"), encoding="utf-8") as f:
        blocks = re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)
    assert len(blocks) >= 3
    os.symlink(os.path.join(FIXTURES, "llama"), tmp_path / "OUT")
    os.symlink(os.path.join(FIXTURES, "minilm"), tmp_path / "OUT-cls")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(block, f"docs/deploy.md (python block {i + 1})", "exec"), namespace)
            except Exception as e:  # noqa: BLE001  (name the block that broke)
                raise AssertionError(f"docs/deploy.md, python block {i + 1} fails: {type(e).__name__}: {e}") from e
