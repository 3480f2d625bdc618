"""What tests check about folders: byte-identical trees, no leftover staging entries, edited copies."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil


def tree_hashes(root) -> dict:
    """{relative path: sha256} of every file under root, hidden ones included; empty folders count too."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for d in dirnames:
            out.setdefault(os.path.relpath(os.path.join(dirpath, d), root) + "/", "dir")
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def hidden_entries(root) -> list:
    """Names under root that start with '.' (staging, old, tmp leftovers)."""
    found = []
    for dirpath, dirnames, files in os.walk(root):
        found += [os.path.join(dirpath, n) for n in dirnames + files if n.startswith(".")]
    return found


def copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


@contextlib.contextmanager
def edited_json(path):
    """``with edited_json(path) as data: del data["key"]``: the file holds ``data`` as the block left it."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    yield data
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def edit_json(path, **changes):
    with edited_json(path) as data:
        data.update(changes)


def lfs_pointer(path) -> None:
    """Replace a weights file with the Git LFS pointer a clone without LFS leaves in its place."""
    with open(path, "w") as f:
        f.write("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123456\n")


def write_lines(path, lines) -> str:
    """Write raw lines (str: as given; dict/list: JSON-encoded) and return the path as str."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def add_bom(path) -> None:
    """``path`` with a UTF-8 byte-order mark put first, as Windows' editors save a file."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)


def unrecorded(out, *names: str) -> None:
    """OUT's base without its text files ``names``, as an export of a model folder without them writes it: removed,
    and left out of the manifest's text files (a copy that lost one is refused at the first text call)."""
    path = os.path.join(out, "base", "edgepeft.json")
    for name in names:
        if os.path.exists(os.path.join(out, "base", name)):
            os.remove(os.path.join(out, "base", name))
    with edited_json(path) as manifest:
        manifest["text_files"] = [n for n in manifest.get("text_files", []) if n not in names]


def fake_hub(root, monkeypatch, repo: str, snapshots: dict) -> None:
    """An offline hub cache at ``root`` holding ``repo`` at each {ref: model folder}; the hub reads it from now on."""
    import huggingface_hub.constants as hub

    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    for i, (ref, model) in enumerate(snapshots.items()):
        commit = str(i + 1) * 40
        shutil.copytree(model, folder / "snapshots" / commit)
        (folder / "refs" / ref).write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(root))  # read at import: the environment alone comes too late
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
