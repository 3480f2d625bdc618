"""Every Python block of README.md and docs/ runs as written, so the documentation cannot drift from the code.

The blocks of a file run in order in one namespace, in one working folder shared by all files (README
first: its quickstart makes the exports the other pages use). That folder holds ``samples/`` (the
sample data) and ``smollm2/``, a tiny Llama with a tokenizer standing in for the decoder the README
tells users to download; ``edgepeft.minilm_path()`` gives a tiny BERT instead of the real MiniLM weights,
so the blocks run in seconds. Same code, smaller models.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil

import pytest

from training_helpers import REPO

# README first: the later pages use the exports its quickstart makes
PAGES = ["README.md", "docs/training.md", "docs/python-api.md", "docs/architecture.md", "docs/cli.md",
         "docs/methods.md", "docs/adding-a-method.md"]


def python_blocks(page: str) -> list[str]:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


DEVICE_PAGES = ["docs/deploy.md"]  # run by the device tier (tests_device/test_deploy_docs.py): genai, no torch


def test_every_page_with_python_is_run_here():
    pages = ["README.md"] + [f"docs/{f}" for f in sorted(os.listdir(os.path.join(REPO, "docs"))) if f.endswith(".md")]
    assert {p for p in pages if python_blocks(p)} <= set(PAGES) | set(DEVICE_PAGES)
    assert all(os.path.isfile(os.path.join(REPO, p)) for p in PAGES)


MODULES = {"edgepeft", "json", "np", "numpy", "os", "torch", "transformers", "peft", "onnxruntime", "ort"}


@pytest.mark.parametrize("page", PAGES + DEVICE_PAGES)
def test_each_block_imports_the_modules_it_uses(page):
    """A block with imports of its own stands alone: it imports every module it uses. The blocks of a page run in
    one namespace, so training.md's own loop, which used ``edgepeft`` without importing it, passed here and was a
    NameError copied alone. (A block without imports goes on from the one before, as README's do.)"""
    import ast

    for i, block in enumerate(python_blocks(page)):
        tree = ast.parse(block)
        imported = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not imported or (used & MODULES) <= imported, \
            f"{page}, python block {i + 1} uses {sorted((used & MODULES) - imported)}"


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory, text_model):
    """The working folder the blocks run in, with edgepeft.minilm_path() pointing at a tiny BERT."""
    import edgepeft.models

    folder = tmp_path_factory.mktemp("docs")
    os.symlink(os.path.join(REPO, "samples"), folder / "samples")
    shutil.copytree(text_model("llama"), folder / "smollm2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(edgepeft.models, "minilm_path", lambda: text_model("bert"))
        mp.chdir(folder)
        yield folder


_RAN: set = set()


def run_page(page: str) -> None:
    """Run a page's blocks in order in one namespace (once per session), naming the block that fails."""
    if page in _RAN:
        return
    namespace = {"__name__": f"docs:{page}"}
    for i, block in enumerate(python_blocks(page)):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(block, f"{page} (python block {i + 1})", "exec"), namespace)
            except Exception as e:  # noqa: BLE001  (name the block that broke)
                raise AssertionError(f"{page}, python block {i + 1} fails: {type(e).__name__}: {e}") from e
    _RAN.add(page)


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_as_written(page, docs_folder):
    run_page("README.md")  # its quickstart makes the exports the other pages use
    run_page(page)


def test_method_pages_name_every_built_in_method():
    """A built-in method has its row in docs/methods.md (its config class), in training.md's default-rate table (its
    rate and option defaults as its config sets them: a hunt changed a rate and removed a row, and this test matched
    the results table's rows below) and in its usage line."""
    from edgepeft.tuners import methods

    def page(name):
        with open(os.path.join(REPO, name), encoding="utf-8") as f:
            return f.read()

    built_in = [m for m in methods() if m.config_cls.__module__.startswith("edgepeft.")]  # not a test's toy method
    assert [m.config_cls.__name__ for m in built_in if f"`{m.config_cls.__name__}(" not in page("docs/methods.md")] == []
    table = page("docs/training.md").split("| method | default `--lr` | other defaults |\n| --- | --- | --- |\n")[1]
    rows = {cells[0]: cells[1:] for line in table.split("\n\n")[0].splitlines()
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert sorted(rows) == sorted(m.name for m in built_in)
    for m in built_in:
        rate, others = rows[m.name]
        assert float(rate) == m.config_cls.default_lr, m.name
        assert all(f"{k} {v}" in others for k, v in m.config_cls.training_defaults.items()), m.name
    usage = re.search(r"--method ([\w|]+)", page("docs/training.md"))[1].split("|")  # its usage line
    assert sorted(usage) == sorted(m.name for m in built_in)


def test_architecture_names_every_module():
    """A module a newcomer cannot find in docs/architecture.md's map is one they read the whole tree for."""
    with open(os.path.join(REPO, "docs", "architecture.md"), encoding="utf-8") as f:
        page = f.read()
    unnamed = []
    for package in ["edgepeft", "edgepeft/training", "edgepeft/tuners", "exporters", "runtimes", "runtimes/js/src"]:
        for name in sorted(os.listdir(os.path.join(REPO, package))):
            if name.endswith((".py", ".js")) and name not in ("__init__.py", "__main__.py") and \
                    not re.search(rf"`([\w./]+/)?{re.escape(name)}`", page):
                unnamed.append(f"{package}/{name}")
    assert unnamed == []


def test_every_cli_flag_is_documented():
    """docs/cli.md (and training.md for train) name every flag each command takes, its negative form too."""
    from edgepeft.cli import cli

    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        pages = f.read()
    with open(os.path.join(REPO, "docs", "training.md"), encoding="utf-8") as f:
        pages += f.read()
    flags = {f"{name} {opt}" for name, command in cli.commands.items() for p in command.params
             for opt in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ())) if opt.startswith("--")}
    assert sorted(f for f in flags if not re.search(re.escape(f.split(" ", 1)[1]) + r"\b", pages)) == []


def test_python_api_signatures_are_the_code_s():
    """python-api.md's tables show each call's parameters: a name there that the code lacks (`load_adapter(path=...)`
    was a TypeError: the parameter is `source`) or a default that differs is a page to correct."""
    import inspect

    import edgepeft
    from edgepeft.runtimes import Runtime

    with open(os.path.join(REPO, "docs", "python-api.md"), encoding="utf-8") as f:
        cells = "\n".join(re.findall(r"^\| (.*?) \|", f.read(), flags=re.M))  # each row's first cell: the calls
    checked = 0
    for name, args in set(re.findall(r"`((?:rt|Runtime|edgepeft)[\w.]*)\(([^`()]*)\)`", cells)):
        obj = Runtime if name.split(".")[0] in ("rt", "Runtime") else edgepeft
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
        signature = inspect.signature(obj) if callable(obj) else None  # rt.tokenizer's are a property's
        if signature is None or "**kwargs" in str(signature):  # edgepeft.train(model=, ...): keywords checked there
            continue
        checked += 1
        for shown in (a.strip() for a in args.split(",") if a.strip() not in ("", "...", "**generation")):
            param, _, default = shown.partition("=")
            assert param in signature.parameters, f"{name}({args}): no parameter {param!r} in {signature}"
            if default:
                assert repr(signature.parameters[param].default) == repr(eval(default)), f"{name}: {param} in {signature}"
    assert checked > 15
