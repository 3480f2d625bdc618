"""What the command line says and does on mistakes a bug hunt found: each fix's advice works as given.

In-process (``edgepeft.cli.main``): one ``error:`` line, exit 1, no traceback (training_helpers.cli_error).
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from file_checks import edit_json, edited_json, unrecorded, write_lines
from peft_refs import lora_adapter, spec_adapter
from training_helpers import cli_error, cli_ok, seq_cls_rows
from word_tokenizer import PROMPT
from edgepeft.cli import as_flags
from edgepeft.flags import method_options
from edgepeft.errors import ArtifactNotFoundError, ConfigError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime


def test_target_modules_with_spaces_name_every_module():
    """"q_proj, v_proj" is two modules (the space once made " v_proj", which matched nothing, silently)."""
    assert method_options("lora", None, None, "q_proj, v_proj", []) == {"target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError, match="--target-modules 'q_proj,' has an empty name"):
        method_options("lora", None, None, "q_proj,", [])
    # found by a hunt: a number Python's JSON takes no int of, or arrays nested too deep, were tracebacks
    for value in ("1" * 5000, "[" * 100000):
        assert method_options("lora", None, None, None, [f"lora_dropout={value}"]) == {"lora_dropout": value}


def test_an_adapter_config_with_a_number_of_5000_digits_is_named(tmp_path):
    from edgepeft import load_config
    from edgepeft.errors import CorruptArtifactError

    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 1%s}' % ("0" * 5000))
    with pytest.raises(CorruptArtifactError, match=r"adapter_config.json: not valid JSON \(Exceeds the limit .*\); re-save"):
        load_config(str(tmp_path))


def test_flags_that_contradict_or_do_nothing_are_said(peft_adapter, text_model, tmp_path, capsys):
    """A shorthand and --option setting one field, --resume with --overwrite: refused; --qtol on a float32 export
    and --ort-adapter with --merge: a note (they do nothing there)."""
    with pytest.raises(ConfigError, match="--r and --option r=... both set r; give one of them"):
        method_options("lora", 2, None, None, ["r=16"])
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(4))
    line = cli_error(capsys, "train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out",
                     tmp_path / "o", "--resume", "--overwrite")
    assert line == "error: --resume continues OUT's checkpoint and --overwrite starts over; give one of them"
    capsys.readouterr()
    from edgepeft.cli import main

    main(["export", "--adapter", spec_adapter(peft_adapter, "llama", "qv"), "--out", str(tmp_path / "out"), "--qtol", "0.1"])
    assert "note: --qtol only applies with --quantize" in capsys.readouterr().err
    main(["export", "--adapter", spec_adapter(peft_adapter, "llama", "qv"), "--out", str(tmp_path / "merged"), "--merge",
          "--ort-adapter"])  # was silently ignored
    assert "note: --ort-adapter writes adapter files; --merge writes none" in capsys.readouterr().err


def test_an_adapter_may_not_be_named_none(peft_adapter, tmp_path):
    """`edgepeft run --adapter none` is the base model: an adapter of that name could never be reached."""
    for name in ("none", "None"):
        with pytest.raises(ConfigError, match=f"adapter name '{name}' means the base model at the command line"):
            export([spec_adapter(peft_adapter, "llama", "qv")], str(tmp_path / "out"), names=[name])
    assert not (tmp_path / "out").exists()


def test_adapter_names_differing_in_case_only_are_refused(peft_adapter, shared_export, tmp_path):
    """A hunt: 'intent' and 'Intent' were two adapters of OUT, one folder on macOS and Windows (a copy of OUT to such
    a device kept one of the two; an export on one replaced the other's files)."""
    qv = spec_adapter(peft_adapter, "llama", "qv")
    with pytest.raises(ConfigError, match="two adapters are named 'intent' and 'Intent', one folder on macOS and Windows"):
        export([qv, qv], str(tmp_path / "new"), names=["intent", "Intent"])
    assert not (tmp_path / "new").exists()
    out = shutil.copytree(shared_export("llama")[0], tmp_path / "out")
    with pytest.raises(ConfigError, match=f"{out} holds an adapter named 'qv', one folder with 'QV' on macOS and "
                                          "Windows; pass --name qv --overwrite to replace it, or another name "
                                          r"\(--name QV_2\)$"):
        export([qv], str(out), names=["QV"])
    # a fixes hunt: "--name qv --overwrite" went to the first --adapter; pasted with the next message's example, it
    # replaced OUT's qv with the other adapter
    from file_checks import copy_adapter

    x1 = copy_adapter(qv, tmp_path / "x1")
    with pytest.raises(ConfigError, match=r"pass --name x1 --name qv --overwrite to replace it, or another name "
                                          r"\(--name x1 --name QV_2\), in --adapter order$"):
        export([x1, qv], str(out), names=["x1", "QV"])
    assert sorted(os.listdir(out / "adapters")) == sorted(shared_export("llama")[1])
    export([x1, qv], str(out), names=["x1", "qv"], overwrite=True)  # the fix, pasted
    with open(out / "adapters" / "qv" / "adapter.json") as f:
        assert json.load(f)["source"] == qv


def test_a_suggested_name_names_every_adapter_before_it_and_none_out_holds(peft_adapter, tmp_path):
    """A paths hunt: "pass --name (e.g. --name my_adapter)" for the second --adapter renamed the first, pasted (names
    go in order), and the same error came back; two folders both named intent: the pasted --name renamed the one the
    message did not name; a suggestion OUT held already led to --overwrite of another adapter."""
    from file_checks import copy_adapter

    qv = spec_adapter(peft_adapter, "llama", "qv")
    good, dotted = copy_adapter(qv, tmp_path / "good"), copy_adapter(qv, tmp_path / "my.adapter")
    x, y = copy_adapter(qv, tmp_path / "x" / "intent"), copy_adapter(qv, tmp_path / "y" / "intent")
    first = str(tmp_path / "first")
    export([qv], first, names=["my_adapter"])
    for i, (adapters, fix) in enumerate((
            ([good, dotted], "pass --name (e.g. --name good --name my_adapter_2, in --adapter order)"),
            ([x, y], "pass --name to tell them apart (e.g. --name intent --name intent_2, in --adapter order)"),
            ([dotted], "pass --name (e.g. --name my_adapter_2)"))):
        out = shutil.copytree(first, tmp_path / f"out{i}")
        with pytest.raises(ConfigError) as e:
            export(adapters, str(out))
        assert str(e.value).endswith(fix), str(e.value)
        names = fix.split("(e.g. ")[1].split(",")[0].rstrip(")").split()[1::2]
        export(adapters, str(out), names=names)  # pasted, it works
        assert Runtime(str(out)).adapter_names == sorted({"my_adapter", *names})


def test_messages_name_the_flags_as_typed():
    run, train = ["run", "OUT", "prompt"], ["train", "--model", "m"]
    assert as_flags("got 0.0 (greedy decoding: do_sample=False)", run) == "got 0.0 (greedy decoding: --greedy)"
    assert as_flags("temperature must be > 0", run) == "--temperature must be > 0"
    assert as_flags("was made with scheduler='linear', this run has scheduler='cosine'", train) == \
        "was made with --scheduler linear, this run has --scheduler cosine"
    assert as_flags("the model must be local", run) == "the model must be local"  # not a flag of run
    # names and text in quotes are as given: an adapter named top_k was "loaded: --top-k", a prompt "top_k=5" too
    assert as_flags("adapter 'lora' is not loaded; loaded: 'max_new_tokens', 'top_k'", run) == \
        "adapter 'lora' is not loaded; loaded: 'max_new_tokens', 'top_k'"
    assert as_flags('text "top_k=5 x" holds half a character', run) == 'text "top_k=5 x" holds half a character'


def test_output_files_and_empty_paths_are_refused_before_the_work(shared_export, tiny_base, tmp_path, capsys):
    """bench's --json and --plot replaced a FIFO, a device (/dev/null, as root) or the link itself; a trailing slash,
    an empty path or one file for both failed after the run or wrote nothing, silently; export took --base '' as no
    --base and named a misspelt --adapter's name before saying the folder is not there; run '' advised --out ''."""
    out = shared_export("bert")[0]
    bench = ["bench", out, "--rounds", "1", "--calls", "1", "--seq", "4"]
    os.mkfifo(tmp_path / "pipe.json")
    for path, said in ((tmp_path / "pipe.json", "is not a regular file (a device, a pipe, a link to nothing)"),
                       (f"{tmp_path}/r.json/", "is a folder; give --json a file path"),
                       ("", "--json '': an empty path; give --json a file path")):
        assert said in cli_error(capsys, *bench, "--json", path)
    assert "given to --json and --plot; give each its own file" in cli_error(
        capsys, *bench, "--json", tmp_path / "same.png", "--plot", tmp_path / "same.png")
    (tmp_path / "real.json").write_text("old")
    os.symlink("real.json", tmp_path / "link.json")
    cli_ok(capsys, *bench, "--json", tmp_path / "link.json")  # written through the link
    assert os.path.islink(tmp_path / "link.json") and json.loads((tmp_path / "real.json").read_text())["setup"]
    assert cli_error(capsys, "run", "", "hello") == "error: '': an empty path; give the folder `edgepeft export --out` wrote"
    missing = tmp_path / "no such"
    assert cli_error(capsys, "export", "--adapter", missing, "--out", tmp_path / "o").startswith(
        f"error: {missing}/adapter_config.json: not found")
    assert cli_error(capsys, "export", "--adapter", "", "--out", tmp_path / "o") == (
        "error: --adapter '': an empty path; give --adapter an adapter folder (save_pretrained's)")
    adapter = next(iter(shared_export("bert")[1].values()))
    assert cli_error(capsys, "export", "--adapter", adapter, "--base", "", "--out", tmp_path / "o") == (
        "error: --base '': an empty path; give --base a local model folder (with config.json) or a hub id")
    assert cli_error(capsys, "train", "--model", "", "--task", "seq-cls", "--data", adapter, "--out", tmp_path / "o") == (
        "error: --model '': an empty path; give --model a local model folder (with config.json) or a hub id")
    assert not (tmp_path / "o").exists()
    for argv in (["export", "--adapter", adapter], ["train", "--model", tiny_base("bert"), "--task", "seq-cls", "--data",
                                                    adapter]):  # "No such file or directory", naming nothing
        assert cli_error(capsys, *argv, "--out", "") == "error: --out '': an empty path; give --out a folder path"


def test_run_on_a_classifier_names_greedy_as_typed(shared_export, capsys):
    out = shared_export("bert")[0]
    line = cli_error(capsys, "run", out, "w1 w2", "--greedy")
    assert line.endswith("it does not generate; drop --greedy")


def test_inspect_and_run_say_what_to_open_instead(shared_export, tiny_base, capsys):
    out, dirs, _ = shared_export("llama")
    hf_adapter = next(iter(dirs.values()))
    cases = {os.path.join(out, "base"): f"is the base folder of the export {out}; open {out} itself",
             # it said to export into OUT/adapters, which export refuses
             os.path.join(out, "adapters"): f"is the adapters folder of the export {out}; open {out} itself",
             hf_adapter: f"export it first with `edgepeft export --adapter {hf_adapter} --out {hf_adapter}-onnx`",
             tiny_base("llama"): f"is a model folder, not an export; export an adapter trained on it with "
                                 f"`edgepeft export --adapter DIR --out {tiny_base('llama')}-onnx`",
             # a file: the advice was to export into it, which is refused
             os.path.join(out, "base", "model.onnx"): f"is a file of the export {out}; give {out} itself",
             os.path.join(tiny_base("llama"), "config.json"): "is a file, not an export; give the folder "
                                                              "`edgepeft export --out` wrote"}
    for folder, advice in cases.items():
        assert advice in cli_error(capsys, "inspect", folder), folder
        with pytest.raises(ArtifactNotFoundError, match=advice.replace("(", r"\(").replace(")", r"\)")):
            Runtime(folder)


def test_inspect_describes_what_runtime_opens_and_describing_calls_hand_out_copies(shared_export, tmp_path, capsys):
    """Found by a hunt: a stray link to nothing in base/ failed inspect (Runtime opened the export); a manifest
    without its source was a traceback; edits of labels() or adapter_info() changed what classify and restaging
    read; adapter_info(None)'s advice was "use adapter=None"."""
    from edgepeft.errors import UnknownAdapterError

    out = str(shutil.copytree(shared_export("llama")[0], tmp_path / "out"))
    os.symlink(str(tmp_path / "nowhere"), os.path.join(out, "base", "notes.txt"))
    manifest = os.path.join(out, "base", "edgepeft.json")
    with edited_json(manifest) as data:
        del data["source"]
    shown = cli_ok(capsys, "inspect", out)
    assert "from a source not recorded" in shown
    rt = Runtime(out)
    name = rt.adapter_names[0]
    rt.adapter_info(name)["graph"] = "elsewhere.onnx"
    rt.adapter_info(name)["slots"].clear()
    assert rt.adapter_info(name)["graph"] == "adapter.onnx" and rt.adapter_info(name)["slots"]
    rt.manifest["labels"] = ["neg", "pos"]  # as a classifier's base records them (labels(None))
    rt.labels(None).reverse()
    assert rt.labels(None) == ["neg", "pos"]
    for call in (rt.adapter_info, rt.adapter_dir):
        with pytest.raises(UnknownAdapterError, match=r"^adapter None is the base model, which has no adapter folder "
                           r"or manifest; the base's own are rt.base_dir and rt.manifest$"):
            call(None)


def test_a_messages_export_command_pastes_into_a_shell_as_it_is(tmp_path, capsys):
    """Folders with spaces: the command an HF PEFT adapter folder's message gives runs the export it names."""
    import shlex

    adapter = str(tmp_path / "my adapters" / "qv")
    os.makedirs(adapter)
    write_lines(os.path.join(adapter, "adapter_config.json"), ["{}"])
    line = cli_error(capsys, "inspect", adapter)
    command = shlex.split(line.split("`")[1])
    assert command == ["edgepeft", "export", "--adapter", adapter, "--out", adapter + "-onnx"]


def test_suggested_export_commands_name_the_adapter_as_export_takes_it(peft_adapter, shared_export, tmp_path, capsys):
    """A folder whose name export refuses ('my adapter', 'sp ace'): the command a message gave failed, pasted,
    with "adapter name ... must be letters, digits, '_', '-'"; and a suggested name OUT holds already failed with
    "exists; pass --overwrite". The commands below are run as given."""
    import shlex

    from edgepeft.cli import main
    from edgepeft.errors import AdapterBaseMismatchError

    adapter = str(tmp_path / "my adapter")
    shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), adapter)
    for more in ([], ["--overwrite"]):  # the second time, OUT holds its export: opened, or exported again over it
        command = shlex.split(cli_error(capsys, "inspect", adapter).split("`")[1])
        assert command == ["edgepeft", "export", "--adapter", adapter, "--out", adapter + "-onnx", "--name", "my_adapter", *more]
        main(command[1:])
    assert Runtime(adapter + "-onnx").adapter_names == ["my_adapter"]
    # a folder of OUT made for another base: it goes, and its adapter comes back under a name export takes
    out = str(shutil.copytree(shared_export("llama")[0], tmp_path / "out"))
    shutil.copytree(os.path.join(out, "adapters", "qv"), os.path.join(out, "adapters", "sp_ace"))  # taken
    foreign = os.path.join(out, "adapters", "sp ace")
    shutil.copytree(os.path.join(adapter + "-onnx", "adapters", "my_adapter"), foreign)
    edit_json(os.path.join(foreign, "adapter.json"), base_fingerprint="0" * 64)
    with pytest.raises(AdapterBaseMismatchError) as e:
        Runtime(out)
    assert (f"remove {foreign}, then re-export its adapter into this OUT: `edgepeft export --adapter DIR --out {out} "
            f"--name sp_ace_2`; or, where this OUT is a copy, copy the export it came from again") in str(e.value)
    shutil.rmtree(foreign)
    main(shlex.split(str(e.value).split("`")[1].replace("DIR", shlex.quote(adapter)))[1:])
    assert {"sp_ace", "sp_ace_2"} <= set(Runtime(out).adapter_names)


def test_run_says_one_line_for_a_sampling_value_it_refuses(text_export, capsys):
    """A temperature too small for float32 printed numpy's two RuntimeWarnings (with their source lines) before the
    error; --seed -1 on greedy decoding printed a note that the seed goes unused, then refused it."""
    import warnings

    out = text_export[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning printed to the terminal fails the run here
        line = cli_error(capsys, "run", out, PROMPT, "--adapter", "tok", "--do-sample", "--temperature", "1e-50")
    assert line == "error: cannot sample: the scores are not finite (NaN or infinite logits, or temperature 1e-50 " \
                   "too small for float32); raise the temperature or use greedy decoding"
    from edgepeft.cli import main

    for flag, value, said in (("--seed", "-1", "--seed must be an integer >= 0, got -1"),
                              ("--top-p", "nan", "--top-p must be a finite number, got nan")):
        with pytest.raises(SystemExit):
            main(["run", out, PROMPT, "--adapter", "tok", flag, value])
        assert capsys.readouterr().err == f"error: {said}\n"  # no note before it that the value goes unused
    with pytest.raises(ConfigError, match="temperature must be a finite number"):  # an int no float holds: a TypeError
        Runtime(out).generate_text(PROMPT, adapter="tok", do_sample=True, temperature=10 ** 400)


def test_an_export_or_an_exported_adapter_given_as_adapter_is_named_so(shared_export, tmp_path, capsys):
    """Both said "adapter_config.json: not found; pass an adapter folder saved by save_pretrained", where the
    opposite mix-up (an adapter folder where an export goes) is named exactly."""
    out = shared_export("llama")[0]
    line = cli_error(capsys, "export", "--adapter", out, "--out", str(tmp_path / "x"))
    assert line.endswith("this folder is an export (OUT) of `edgepeft export`; pass the folder an adapter was saved "
                         "in (save_pretrained, edgepeft train --out), or run this export (Runtime, edgepeft run)")
    line = cli_error(capsys, "export", "--adapter", os.path.join(out, "adapters", "qv"), "--out", str(tmp_path / "x"))
    assert line.endswith(f"this folder is an adapter exported into {out}, served from there (edgepeft run {out} ... "
                         "--adapter qv); to export it again, pass the folder it was saved in")
    assert not os.path.exists(tmp_path / "x")


def test_chat_without_a_template_names_the_file(text_export, tmp_path):
    out = str(tmp_path / "no-template")
    shutil.copytree(text_export[0], out)
    config = os.path.join(out, "base", "tokenizer_config.json")
    with edited_json(config) as data:
        data.pop("chat_template", None)
    unrecorded(out, "chat_template.jinja")  # where transformers' save_pretrained puts it: an export of a model without
    with pytest.raises(ConfigError) as e:
        Runtime(out).generate_text([{"role": "user", "content": PROMPT}], adapter="tok", chat=True)
    assert str(e.value).startswith(f"{config}: has no chat_template") and "chat=False" in str(e.value)


def test_bench_takes_a_merged_exports_name_and_writes_no_export_file(peft_adapter, tmp_path, capsys):
    out = str(tmp_path / "merged")
    export([spec_adapter(peft_adapter, "llama", "qv")], out, merge=True)
    argv = ["bench", out, "--adapter", "qv", "--rounds", "1", "--calls", "2", "--seq", "4"]
    shown = cli_ok(capsys, *argv, "--adapter", "none", "--new-tokens", "2")  # none: the base, as `run --adapter none`
    assert "| qv (merged into the base) |" in shown and "| qv | " in shown  # latency and tokens/s rows alike
    assert "| none |" not in shown
    manifest = os.path.join(out, "base", "edgepeft.json")
    before = open(manifest, "rb").read()
    line = cli_error(capsys, *argv, "--json", manifest)
    assert line == f"error: {manifest}: lies inside {out}/base of the export {out}, whose files exports own; give --json a path outside that folder"
    assert open(manifest, "rb").read() == before
    # a folder os.access calls writable where no file can be made: after the whole run, of a hidden temp file
    line = cli_error(capsys, *argv, "--json", "/proc/b.json")
    assert line.startswith("error: /proc: cannot write here (") and line.endswith("); give --json another folder")
    assert cli_error(capsys, "export", "--adapter", spec_adapter(peft_adapter, "llama", "qv"), "--out",
                     "/proc/x").startswith("error: /proc: cannot write here (")  # export --out alike, before its work
    cli_ok(capsys, *argv, "--json", str(tmp_path / "new" / "b.json"))  # a folder still to be made: written there
    assert os.path.isfile(tmp_path / "new" / "b.json")
    line = cli_error(capsys, *argv, "--plot", str(tmp_path / "chart.svg"))
    assert line == f"error: {tmp_path / 'chart.svg'}: --plot draws a PNG image; give it a file name ending in .png"
    # the name that works is named (it said 'it holds none' / 'loaded: none')
    assert "(it holds 'qv')" in cli_error(capsys, "bench", out, "--adapter", "QV", "--rounds", "1", "--calls", "1")
    assert "loaded: none; 'qv' is merged into the base" in cli_error(capsys, "run", out, "w1", "--adapter", "QV")


def test_save_last_says_which_epoch_out_holds(text_model, tmp_path, capsys):
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(16))
    argv = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--eval", data,
            "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--quiet"]
    last = cli_ok(capsys, *argv, "--out", tmp_path / "last", "--save", "last")
    assert f"the last epoch's adapter (2, --save last) is in {tmp_path / 'last'}" in last
    best = cli_ok(capsys, *argv, "--out", tmp_path / "best")
    assert "the best epoch's adapter (" in best and "--save last" not in best


def test_an_adapter_for_another_architecture_under_base_says_drop_base(peft_adapter, tiny_base, tmp_path):
    """--base of another architecture than the adapter's: the refusal names the base it was trained on."""
    gpt2 = spec_adapter(peft_adapter, "gpt2", "attn")
    with pytest.raises(ConfigError) as e:
        export([gpt2], str(tmp_path / "out"), base=tiny_base("llama"))
    assert str(e.value).startswith(os.path.join(gpt2, "adapter_config.json"))
    assert str(e.value).endswith(f"it was trained on {tiny_base('gpt2')}: drop --base to export it with that base")


def test_a_trained_base_classifier_keeps_its_label_names_and_gets_no_untrained_note(text_model, tmp_path, capsys):
    """A base that is a trained classifier (config.json id2label NEGATIVE/POSITIVE) with an HF PEFT LoRA on it:
    transformers names the classes so; edgepeft said '0'/'1', and `run --adapter none` called its head untrained."""
    from peft_refs import bert_lora_classifier

    bert_lora_classifier(text_model("bert"), tmp_path, {0: "NEGATIVE", 1: "POSITIVE"})
    out = str(tmp_path / "out")
    export([str(tmp_path / "adapter")], out, names=["s"])
    rt = Runtime(out)
    assert rt.labels("s") == rt.labels(None) == ["NEGATIVE", "POSITIVE"]
    assert rt.classify("hello world", adapter="s")["label"] in ("NEGATIVE", "POSITIVE")
    from edgepeft.cli import main

    untrained = str(tmp_path / "untrained")  # a plain BERT: its head is made at load
    export([lora_adapter(tmp_path / "plain", text_model("bert"), "seq-cls", 2, 2, r=2, target_modules=["query"])],
           untrained, names=["p"])
    for folder, noted in ((out, False), (untrained, True)):
        capsys.readouterr()
        main(["run", folder, "--adapter", "none", "hello world"])
        out_text, err = capsys.readouterr()
        assert ("note: no adapter: the base model's classifier head is untrained" in err) == noted, folder
        assert noted or "NEGATIVE\t" in out_text  # run prints each label's probability


def test_adapters_naming_one_base_folder_relative_and_absolute_export_together(tiny_base, tmp_path, monkeypatch):
    """Two adapters trained on one base folder, one recording it relative and one absolute, were refused as
    "different bases"."""
    base = tiny_base("llama")
    monkeypatch.chdir(os.path.dirname(base))
    relative = lora_adapter(tmp_path / "rel", os.path.basename(base), "causal-lm", 1, r=2, target_modules=["q_proj"])
    absolute = lora_adapter(tmp_path / "abs", base, "causal-lm", 2, r=2, target_modules=["v_proj"])
    export([relative, absolute], str(tmp_path / "out"), names=["rel", "abs"])
    assert Runtime(str(tmp_path / "out")).adapter_names == ["abs", "rel"]


def test_paths_in_messages_and_suggested_commands_are_as_given(peft_adapter, shared_export, tmp_path, capsys,
                                                                 monkeypatch):
    """Paths with spaces, 'lr=' or '~' in them: the CLI squeezed repeated spaces (the resume command printed on
    Ctrl-C named a folder that does not exist), rewrote 'lr=0.01' inside a path into '--lr 0.01', suggested
    commands without quotes ('.-onnx' for '.'), took a quoted '~' for a hub id, and an --out through a link into
    an export's adapters/ broke that export."""
    import edgepeft.cli as cli_module
    from edgepeft.errors import TrainingInterrupted

    missing = tmp_path / "sweep  lr=0.01 b"
    line = cli_error(capsys, "run", str(missing), "hello")
    assert f"{missing}" in line and "--lr" not in line
    adapter = shutil.copytree(peft_adapter("llama", "paths-qv", r=2, target_modules=["q_proj"]), tmp_path / "my adapter")
    monkeypatch.chdir(adapter)
    line = cli_error(capsys, "run", ".", "hello")
    assert f"`edgepeft export --adapter . --out '{adapter}-onnx' --name my_adapter`" in line  # '.' is no name
    line = cli_error(capsys, "train", "--model", "~/no-such-model", "--task", "seq-cls", "--data", "d.jsonl", "--out",
                     str(tmp_path / "o"))
    assert line == (f"error: ~/no-such-model: '~' is not expanded here; give --model the full path, "
                    f"{os.path.expanduser('~/no-such-model')}")
    out = shared_export("llama")[0]
    os.symlink(os.path.join(out, "adapters"), tmp_path / "link")
    line = cli_error(capsys, "export", "--adapter", str(adapter), "--name", "nested", "--out", str(tmp_path / "link" / "nested"))
    assert "lies inside the export" in line and not os.path.exists(os.path.join(out, "adapters", "nested"))

    os.symlink(tmp_path / "unmounted", tmp_path / "dangling")  # a link to a disk not mounted: "File exists"
    line = cli_error(capsys, "export", "--adapter", str(adapter), "--name", "x", "--out", str(tmp_path / "dangling"))
    assert line == (f"error: {tmp_path / 'dangling'}: is a link to {tmp_path / 'unmounted'}, which does not exist; "
                    "create or mount it, or give --out another folder")

    def interrupted(**kwargs):
        raise TrainingInterrupted("interrupted; continue with: edgepeft train --out 'run  two' --resume")

    monkeypatch.setattr(cli_module.cli, "main", interrupted)
    with pytest.raises(SystemExit):
        cli_module.main(["train"])
    assert capsys.readouterr().err == "interrupted; continue with: edgepeft train --out 'run  two' --resume\n"


def test_a_field_edgepeft_ignores_is_one_note_said_once(peft_adapter, tmp_path, capsys):
    """A newer PEFT's field in adapter_config.json was Python's UserWarning with its source line, printed twice (each
    reading of the config)."""
    from edgepeft.cli import main

    adapter = str(tmp_path / "adapter")
    shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), adapter)
    edit_json(os.path.join(adapter, "adapter_config.json"), future_field=True)
    import warnings

    before = warnings.showwarning
    main(["export", "--adapter", adapter, "--out", str(tmp_path / "out")])
    assert warnings.showwarning is before  # the command's notes end with it: an app's own warnings show as before
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "future_field" in line]
    assert said == [f"note: {adapter}/adapter_config.json: ignoring fields this edgepeft does not know: future_field"]


def test_edgepeft_warnings_have_a_category_of_their_own(peft_adapter, tmp_path, capsys):
    """An app filters edgepeft's notes by category; the CLI tells them by it too (it told them by the warning's
    file, which a warning credited to its caller's file would escape)."""
    import warnings

    from edgepeft import EdgePeftWarning, load_config
    from edgepeft.processes import notes_once

    adapter = str(tmp_path / "adapter")
    shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), adapter)
    edit_json(os.path.join(adapter, "adapter_config.json"), future_field=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgePeftWarning)
        with pytest.raises(EdgePeftWarning, match="future_field"):
            load_config(adapter)
    assert issubclass(EdgePeftWarning, UserWarning)  # HF PEFT's warnings are UserWarnings: filters of them still act
    with warnings.catch_warnings(), notes_once():
        warnings.simplefilter("always")
        warnings.warn("said by a caller's line", EdgePeftWarning)  # credited to this file, not edgepeft's
        warnings.warn("not ours", UserWarning)
    err = capsys.readouterr().err
    assert "note: said by a caller's line\n" in err and "not ours" not in err  # shown as Python shows it (pytest's)


def test_run_prints_the_generated_text_as_it_is_into_a_pipe(text_export, capsys, monkeypatch):
    """Found by a hunt: click took ANSI escapes (a byte-level model may generate any byte) out of the text when
    stdout was no terminal, so `edgepeft run ... > out.txt` held another text than stream_text gave."""
    from edgepeft.cli import main

    pieces = ["red: ", "\x1b[31m", "x", "\x1b[0m", " done"]
    monkeypatch.setattr(Runtime, "stream_text", lambda self, *a, **k: iter(pieces))
    capsys.readouterr()
    main(["run", text_export[0], PROMPT, "--adapter", "tok", "--max-new-tokens", "3"])
    assert capsys.readouterr().out == "".join(pieces) + "\n"


def test_a_prompt_read_from_standard_input_that_is_not_utf8_is_one_line(text_export):
    """Found by a hunt: `printf 'hello \\xff' | edgepeft run OUT -` was a UnicodeDecodeError traceback, where the same
    bytes as an argument are one line."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgepeft", "run", text_export[0], "-", "--adapter", "tok"],
                          input=b"hello \xff world\n", capture_output=True, timeout=300)
    assert done.returncode == 1 and done.stderr.decode().strip() == (
        "error: text 'hello \\udcff world' holds half of a character (a lone surrogate: bytes read in another encoding "
        "than UTF-8); pass it as UTF-8 text")


def test_a_target_module_given_as_one_text_is_told_the_command_lines_list(text_model, tmp_path, capsys):
    """Found by a hunt: --option target_modules=query (a regular expression matching no whole name) was told to
    give a list (['query']), which --option reads as a text and --target-modules as one name: both failed again."""
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    argv = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out", str(tmp_path / "o"),
            "--epochs", "1", "--quiet"]
    line = cli_error(capsys, *argv, "--option", "target_modules=query")
    assert line.endswith("give a list (['query']; at the command line --target-modules query) or '.*query'"), line
    cli_ok(capsys, *argv, "--target-modules", "query")  # the advice works


def test_an_adapter_of_a_method_edgepeft_lacks_is_refused_with_a_fix(tiny_base, tmp_path, capsys, monkeypatch):
    """A hunt: HF PEFT's other methods (LoHa here) were refused naming the supported ones, with no fix; nothing is
    written."""
    import peft

    from tiny import load_reference_base

    hf = peft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                             peft.LoHaConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    hf.save_pretrained(tmp_path / "loha")
    line = cli_error(capsys, "export", "--adapter", tmp_path / "loha", "--out", tmp_path / "out")
    head, methods, fix = line.partition(" supports ")[0], line.partition(" supports ")[2].partition(": ")[0], \
        line.partition(" supports ")[2].partition(": ")[2]  # the methods: a test's toy method too, once registered
    assert head == f"error: {tmp_path / 'loha' / 'adapter_config.json'}: peft_type 'LOHA' is not supported; edgepeft"
    assert {"BOTTLENECK", "IA3", "LORA", "PREFIX_TUNING", "PROMPT_TUNING"} <= set(methods.split(", "))
    assert fix == "train the adapter again with one of them (edgepeft train --method, or HF PEFT)"
    assert not os.path.exists(tmp_path / "out")
    with monkeypatch.context() as m:  # a hunt: [train,cpu] installs no peft, and LoHa was told to import its plugin
        m.setitem(sys.modules, "peft", None)
        assert cli_error(capsys, "export", "--adapter", tmp_path / "loha", "--out", tmp_path / "out") == line
    config = json.loads((tmp_path / "loha" / "adapter_config.json").read_text())  # a hunt: a plugin's, not imported
    (tmp_path / "loha" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "DIMSCALE"}))
    line = cli_error(capsys, "export", "--adapter", tmp_path / "loha", "--out", tmp_path / "out")
    assert line.endswith("or HF PEFT); a method of your own is known once its package is imported: run `python -c "
                         "\"import PACKAGE, edgepeft.cli; edgepeft.cli.main()\" ...` (docs/adding-a-method.md)")


def test_an_option_of_no_finite_number_says_so(text_model, tmp_path, capsys):
    """A hunt: NaN and infinity were "cannot be saved in the training log; give a number", though one was given."""
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(4))
    for flags, shown in ((["--alpha", "nan"], "lora_alpha=nan"), (["--option", "lora_dropout=-Infinity"], "lora_dropout=-inf")):
        line = cli_error(capsys, "train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data, "--out",
                         tmp_path / "o", *flags)
        assert line == f"error: option {shown} must be a finite number"
        assert not os.path.exists(tmp_path / "o")


def test_a_moved_base_the_adapter_records_is_named_where_it_is_recorded(peft_adapter, tmp_path, capsys):
    """Found by a hunt: "<path>: no such folder; give --base ..." named a path the user never typed."""
    adapter = str(tmp_path / "adapter")
    shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), adapter)
    edit_json(os.path.join(adapter, "adapter_config.json"), base_model_name_or_path=str(tmp_path / "moved-base"))
    line = cli_error(capsys, "export", "--adapter", adapter, "--out", tmp_path / "out")
    assert line == (f"error: {tmp_path / 'moved-base'}: no such folder; give --base a local model folder (with "
                    f"config.json) or a hub id (base_model_name_or_path in {adapter}/adapter_config.json)")


def test_an_adapter_whose_every_module_reaches_no_output_is_refused_in_a_line(tiny_base, tmp_path, capsys):
    """LoRA on BERT's pooler.dense in a feature-extraction export (the pooler reaches no last_hidden_state): export
    failed with "OUT/adapters/.staging-...: ONNX Runtime cannot run the adapter graph; re-export the adapter" (a graph
    of no output, a deleted file, a fix that cannot work) after ONNX Runtime's log line."""
    import edgepeft
    from tiny import load_reference_base

    base = tiny_base("bert")
    model = edgepeft.get_peft_model(load_reference_base(base, "feature-extraction"), edgepeft.LoraConfig(
        task_type="FEATURE_EXTRACTION", r=2, target_modules=["pooler.dense"]))
    model.save_pretrained(str(tmp_path / "pool"))
    line = cli_error(capsys, "export", "--adapter", str(tmp_path / "pool"), "--out", str(tmp_path / "out"))
    assert line == (f"error: {tmp_path / 'pool'}: none of the adapter's modules (pooler.dense) reaches "
                    "last_hidden_state, this export's output: it would change nothing here (HF PEFT's output is the "
                    "base's); train it on modules the output reads (target_modules), or leave it out")
    assert not os.path.exists(tmp_path / "out")


def test_a_sigterm_exits_143_and_a_later_ctrl_c_130(monkeypatch, sigint_raises, capsys):
    """The command line answers SIGTERM as Ctrl-C, with its own status; one command's SIGTERM is not the next's (main
    called again in one process)."""
    import signal

    from edgepeft.cli import cli, main

    for sent, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        monkeypatch.setattr(cli.commands["inspect"], "callback", lambda **kw: signal.raise_signal(sent))
        with pytest.raises(SystemExit) as e:
            main(["inspect", "OUT"])
        assert e.value.code == status and capsys.readouterr().err.splitlines()[-1] == "aborted"


def test_ctrl_c_while_the_command_line_loads_is_no_traceback():
    """Ctrl-C in the command's first fifth of a second (numpy and click loading) printed a traceback: the `edgepeft`
    script and `python -m edgepeft` load the command line where a Ctrl-C ends as one later does."""
    import subprocess
    import sys
    import tomllib

    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["edgepeft"] == "edgepeft.__main__:run"
    script = ("import sys\nclass Finder:\n    def find_spec(self, name, *a):\n"
              "        if name == 'click': raise KeyboardInterrupt\n"  # as the key comes while click loads
              "sys.meta_path.insert(0, Finder())\nfrom edgepeft.__main__ import run\nrun()\n")
    done = subprocess.run([sys.executable, "-c", script, "inspect", "OUT"], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (130, "aborted\n")
