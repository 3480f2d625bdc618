"""An export copied to a device, an adapter's graph lost or cut short on the way: found by a docs hunt, the message
said "re-export the adapter", which, followed literally, was refused (the name is taken: --overwrite; an int8 base:
--quantize int8). Each message now gives the copy to repeat and the whole re-export, which the tests run."""
from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest

from training_helpers import cli_error, cli_ok

from edgepeft.errors import EdgePeftError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


@pytest.fixture(scope="module")
def int8_export(peft_adapter, tmp_path_factory):
    adapter = peft_adapter("llama", "copied-int8", r=2, target_modules=["q_proj", "v_proj"], seed=4)
    out = str(tmp_path_factory.mktemp("copied") / "out")
    export([adapter], out, names=["qv"], quantize="int8", qtol=0.5)  # another than the default: repeated
    return out, adapter


@pytest.mark.parametrize("damage", ["removed", "cut short"])
def test_a_lost_adapter_graph_names_a_reexport_that_works(int8_export, tmp_path, capsys, damage):
    out = shutil.copytree(int8_export[0], tmp_path / "device")
    graph = out / "adapters" / "qv" / "adapter.onnx"
    if damage == "removed":
        graph.unlink()
    else:
        graph.write_bytes(graph.read_bytes()[:100])
    line = cli_error(capsys, "run", out, "--adapter", "qv", "hello", "--max-new-tokens", "2")
    assert line.startswith(f"error: {graph}: ") and f"copy {out / 'adapters' / 'qv'} again from its export, or " in line
    command = re.search(r"`edgepeft (export [^`]*)`", line).group(1)
    assert command == (f"export --adapter {int8_export[1]} --out {out} --name qv --overwrite --quantize int8 --qtol 0.5")
    cli_ok(capsys, *shlex.split(command))
    ids = [[5, 9, 2, 7]]
    assert (Runtime(str(out)).generate(ids, adapter="qv", max_new_tokens=3) ==
            Runtime(int8_export[0]).generate(ids, adapter="qv", max_new_tokens=3)).all()


def test_an_adapter_folder_loaded_from_elsewhere_is_told_to_copy_it_again(int8_export, tmp_path):
    folder = shutil.copytree(os.path.join(int8_export[0], "adapters", "qv"), tmp_path / "qv")
    (folder / "adapter.onnx").unlink()
    with pytest.raises(EdgePeftError) as e:
        Runtime(int8_export[0], load_adapters=False).load_adapter(str(folder))
    assert str(e.value) == (f"{folder / 'adapter.onnx'}: adapter graph missing; copy {folder} again from the export it "
                            "came from")


def test_an_hf_peft_folder_copied_into_adapters_is_moved_out_and_exported_as_said(int8_export, tmp_path, capsys):
    """A lifecycle hunt: it said `edgepeft export --adapter OUT/adapters/x --out OUT`, which is refused (it lies inside
    OUT's adapters/), while every other adapter of OUT stayed refused."""
    out = shutil.copytree(int8_export[0], tmp_path / "device")
    stray = shutil.copytree(int8_export[1], out / "adapters" / "hf")
    line = cli_error(capsys, "inspect", out)
    assert line == (f"error: {stray}: is an adapter folder in HF PEFT format, not an exported one; move it out of "
                    f"{out / 'adapters'} (mv {stray} DIR), then export it into this OUT with `edgepeft export --adapter "
                    f"DIR --out {out} --quantize int8 --qtol 0.5`")
    moved = tmp_path / "moved"
    os.rename(stray, moved)
    cli_ok(capsys, "export", "--adapter", moved, "--out", out, "--quantize", "int8", "--qtol", "0.5")
    assert Runtime(str(out)).adapter_names == ["moved", "qv"]


def test_a_copy_that_lost_a_tokenizer_file_is_named_at_the_first_text_call_and_by_inspect(text_export, tmp_path, capsys):
    """A lifecycle hunt: a copy without base/tokenizer_config.json (its model_max_length 16) classified with
    truncation cut at the model's positions, and scored 0.85 for 0.64, while inspect said ok: the runtime reads that
    file as optional. The export records its tokenizer's files now; calls on ids still run."""
    out = shutil.copytree(text_export[0], tmp_path / "device")
    lost = out / "base" / "tokenizer_config.json"
    lost.unlink()
    rt = Runtime(str(out))
    assert rt.generate([[5, 9, 2]], adapter="tok", max_new_tokens=2).shape == (1, 5)  # ids: no text file read
    with pytest.raises(EdgePeftError, match=f"^{re.escape(str(lost))}: missing; copy the export's base folder again"):
        rt.generate_text("w10 w20", adapter="tok", max_new_tokens=2)
    assert cli_error(capsys, "inspect", out).startswith(f"error: {lost}: missing; copy the export's base folder again")


def test_the_reexport_of_a_lost_graph_repeats_base_and_a_folder_of_adapters_kept_elsewhere_is_no_out(
        int8_export, tiny_base, tmp_path, capsys):
    """A review: an export made with --base (a mended copy of the base the adapter records) was told a re-export
    without it, which loaded the recorded base; a library of adapter folders under a folder named adapters/ was told
    to re-export into its parent, writing a new export there."""
    base = shutil.copytree(tiny_base("llama"), tmp_path / "base-copy")
    out = tmp_path / "out"
    export([int8_export[1]], str(out), names=["qv"], base=str(base))
    graph = out / "adapters" / "qv" / "adapter.onnx"
    graph.unlink()
    line = cli_error(capsys, "inspect", out)
    command = re.search(r"`edgepeft (export [^`]*)`", line).group(1)
    assert command.endswith(f"--name qv --overwrite --base {base}")
    cli_ok(capsys, *shlex.split(command))
    assert graph.is_file()
    kept = shutil.copytree(out / "adapters" / "qv", tmp_path / "library" / "adapters" / "qv")
    (kept / "adapter.onnx").unlink()
    with pytest.raises(EdgePeftError, match=f"copy {re.escape(str(kept))} again from the export it came from$"):
        Runtime(str(out), load_adapters=False).load_adapter(str(kept))


def test_a_copy_that_lost_or_cut_its_chat_template_is_named(text_export, tmp_path, capsys):
    """A deploy hunt: a copy without base/chat_template.jinja was told the model has no chat template (pass plain
    text), and one cut short at a tag rendered another prompt while inspect said ok. The export records every text
    file it wrote, with its SHA-256 (inspect: an edit is named too; the runtime serves an edited template)."""
    out = shutil.copytree(text_export[0], tmp_path / "device")
    template = out / "base" / "chat_template.jinja"
    chat = [{"role": "user", "content": "w10"}]
    whole = Runtime(str(out)).generate_text(chat, adapter="tok", chat=True, max_new_tokens=2)
    text = template.read_text()
    template.write_text(text[:text.index("{% if")])  # cut short at a tag: no generation prompt, silently
    assert Runtime(str(out)).generate_text(chat, adapter="tok", chat=True, max_new_tokens=2) is not None
    assert cli_error(capsys, "inspect", out) == (f"error: {template}: not what the export wrote (its SHA-256 differs; "
                                                 "damaged in a copy, or edited?); copy the export's base folder again, or "
                                                 "re-run `edgepeft export` into a fresh --out folder; an edit of yours: "
                                                 "make it in the model folder and export from it, which copies and "
                                                 "records it")
    template.unlink()
    with pytest.raises(EdgePeftError, match=f"^{re.escape(str(template))}: missing; copy the export's base folder again"):
        Runtime(str(out)).generate_text(chat, adapter="tok", chat=True, max_new_tokens=2)
    template.write_text(text)
    assert Runtime(str(out)).generate_text(chat, adapter="tok", chat=True, max_new_tokens=2) == whole
    assert cli_ok(capsys, "inspect", out)


def test_a_copied_adapter_without_its_manifest_or_of_another_base_is_told_to_copy_again(shared_export, tmp_path, capsys):
    """A deploy hunt: a device's copy without adapters/<name>/adapter.json was told only to re-export (no torch there
    to do it with, and placeholders); inspect's "exported for another base" left out the copy that Runtime names."""
    from file_checks import edit_json

    out = shutil.copytree(shared_export("llama")[0], tmp_path / "device")
    folder = out / "adapters" / "qv"
    edit_json(folder / "adapter.json", base_fingerprint="0" * 64)  # made for a newer export of the same model
    assert cli_error(capsys, "inspect", out).endswith("; or, where this OUT is a copy, copy the export it came from "
                                                      "again: its base folder and every adapter")
    (folder / "adapter.json").unlink()
    with pytest.raises(EdgePeftError, match=f"^{re.escape(str(folder / 'adapter.json'))}: .*; copy {re.escape(str(folder))} "
                                            "again from its export, or re-export the adapter"):
        Runtime(str(out))
