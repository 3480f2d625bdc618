"""Values at the command line a hunt found named wrongly or not at all: a prompt '-' with standard input closed, the
adapters bench lists (a name read as a flag), a sampling refusal that blamed the temperature alone, and an adapter
given as '.' (named '.', not its folder's name)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgepeft.errors import InvalidInputError, UnknownAdapterError
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.bench import measure


def test_a_prompt_read_from_closed_standard_input_is_one_line(text_export):
    """`edgepeft run OUT - <&-` (a daemon's, cron's): click hands None for standard input, whose read was a
    traceback."""
    code = "import sys; from edgepeft.cli import main; main(sys.argv[1:])"
    done = subprocess.run([sys.executable, "-c", code, "run", text_export[0], "-"], capture_output=True, text=True,
                          preexec_fn=lambda: os.close(0))  # closed before Python starts: sys.stdin is None
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: PROMPT '-' reads standard input, which is closed; pass the "
                                                    "prompt as an argument")


def test_bench_quotes_the_adapters_it_holds(shared_export):
    """Unquoted, an adapter named like an option (new_tokens) was rewritten as --new-tokens in the error line."""
    out = shared_export("llama")[0]
    rt = Runtime(out)
    held = ", ".join(map(repr, rt.adapter_names))
    with pytest.raises(UnknownAdapterError, match=re.escape(f"holds no adapter 'nope' (it holds {held}); give one")):
        measure(rt, ["nope"], rounds=1, calls=1, seq=4)


def test_a_repetition_penalty_too_small_to_sample_is_named(text_export):
    """Scores divided by a penalty of 1e-40 are infinite, as in transformers: the refusal said to raise the
    temperature, which no temperature mends."""
    rt = Runtime(text_export[0])
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    with pytest.raises(InvalidInputError, match=r"temperature 1\.0 too small for float32, or repetition_penalty 1e-40 too "
                                                r"far from 1\); raise the temperature, bring repetition_penalty nearer to "
                                                r"1, or use greedy decoding$"):
        rt.generate(ids, max_new_tokens=2, do_sample=True, repetition_penalty=1e-40, seed=0)
    with pytest.raises(InvalidInputError, match=r"temperature 1e-40 too small for float32\); raise the temperature or"):
        rt.generate(ids, max_new_tokens=2, do_sample=True, temperature=1e-40, seed=0)


def test_an_adapter_given_as_dot_is_named_by_its_folder(shared_export, tmp_path, monkeypatch):
    """cli.md: the name defaults to the adapter folder's; '.' (run inside the folder) was the name, and refused."""
    name, adapter = next(iter(shared_export("bert")[1].items()))
    monkeypatch.chdir(adapter)
    export(["."], str(tmp_path / "out"))
    assert Runtime(str(tmp_path / "out")).adapter_names == [os.path.basename(adapter)]


def test_an_adapter_given_through_a_link_and_dotdot_is_named_where_the_system_reads_it(shared_export, tmp_path,
                                                                                        monkeypatch):
    """A paths hunt: `--adapter LINK/..` read the link target's parent (the system's '..') but named the adapter,
    and recorded its source, by the folder the text went up to (here the working folder)."""
    import json

    from edgepeft.runtimes.commands import adapter_export_command

    name, adapter = next(iter(shared_export("bert")[1].items()))
    (tmp_path / "work").mkdir()
    os.makedirs(os.path.join(adapter, "runs"), exist_ok=True)
    os.symlink(os.path.join(adapter, "runs"), tmp_path / "work" / "latest")
    monkeypatch.chdir(tmp_path / "work")
    export(["latest/.."], "out")
    with open(os.path.join("out", "adapters", os.path.basename(adapter), "adapter.json")) as f:
        assert json.load(f)["source"] == os.path.realpath(adapter)
    assert Runtime("out").adapter_names == [os.path.basename(adapter)]
    assert "--name" not in adapter_export_command("latest/..", "out")  # its folder's name is one export takes


def test_a_relative_base_folder_is_recorded_where_it_is_and_links_are_counted_by_their_files(shared_export, tiny_base,
                                                                                             tmp_path, monkeypatch):
    """A paths hunt: `--base models/llama` was recorded as typed (inspect showed it as a hub id; a re-export fix
    repeating it failed in another folder, the hub asked for it), and inspect counted an export whose files are links
    into blobs/ (a hub cache's layout) by its links' bytes (790 B for 197 KiB)."""
    import json
    import shutil

    from edgepeft.runtimes.describe import describe_export

    adapter = shared_export("llama")[1]["qv"]
    shutil.copytree(tiny_base("llama"), tmp_path / "models" / "llama")
    monkeypatch.chdir(tmp_path)
    export([adapter], "out", base="models/llama")
    assert Runtime("out").manifest["source"] == str(tmp_path / "models" / "llama")
    shutil.copytree(adapter, "recording")  # an adapter recording it relative: so too (a review)
    settings = json.loads(open("recording/adapter_config.json").read())
    open("recording/adapter_config.json", "w").write(json.dumps({**settings, "base_model_name_or_path": "models/llama"}))
    export(["recording"], "out-recorded")
    assert Runtime("out-recorded").manifest["source"] == str(tmp_path / "models" / "llama")
    size = describe_export("out")["base"]["bytes"]
    os.makedirs("blobs")
    for i, name in enumerate(sorted(os.listdir("out/base"))):
        if os.path.isfile(os.path.join("out/base", name)):
            shutil.move(os.path.join("out/base", name), os.path.join("blobs", f"{i:040d}"))
            os.symlink(os.path.join("..", "..", "blobs", f"{i:040d}"), os.path.join("out/base", name))
    assert describe_export("out")["base"]["bytes"] == size


def test_a_base_of_another_kind_than_the_adapters_task_says_drop_base(shared_export, tiny_base, tmp_path):
    """--base a BERT folder for a Llama causal-LM adapter: "use seq-cls or feature-extraction", which export (its task
    is the adapter's) cannot take; a GPT-2 --base got the fix that works."""
    from edgepeft.errors import EdgePeftError

    adapter = next(iter(shared_export("llama")[1].values()))
    with pytest.raises(EdgePeftError, match=r"has no causal-LM head; .* was trained on .*: drop --base to export it"):
        export([adapter], str(tmp_path / "out"), base=tiny_base("bert"))
    assert not os.path.exists(tmp_path / "out")


def test_python_switches_and_paths_are_checked_as_the_runtimes_are(shared_export, tiny_base, tmp_path, monkeypatch):
    """Python callers pass anything: train(overwrite="false") replaced an adapter and export(merge="no") merged (read
    by truthiness); export(out=None) wrote a folder named None, train(out=None) was a TypeError."""
    import edgepeft
    from edgepeft.errors import ConfigError

    adapter = next(iter(shared_export("bert")[1].values()))
    monkeypatch.chdir(tmp_path)
    args = dict(model=tiny_base("bert"), task="seq-cls", data=str(tmp_path / "d.jsonl"), out=str(tmp_path / "a"))
    for change, said in (({"overwrite": "false"}, "overwrite must be True or False, got 'false'"),
                         ({"progress": "no"}, "progress must be True or False, got 'no'"),
                         ({"out": None}, "out must be a path (a string), got NoneType; give the adapter folder")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            edgepeft.train(**{**args, **change})
    for change, said in (({"merge": "no"}, "merge must be True or False, got 'no'"),
                         ({"ort_adapter": "no"}, "ort_adapter must be True or False, got 'no' (None: where"),
                         ({"out": None}, "export's out must be a folder path (a string), got NoneType")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            export([adapter], **{"out": str(tmp_path / "o"), **change})
    assert os.listdir(tmp_path) == []  # no ./None, no OUT


def test_export_takes_any_os_pathlike_and_refuses_bytes_and_names_that_are_not_text(shared_export, tmp_path):
    """A paths hunt: an os.PathLike other than pathlib's was "<Where object at 0x...>/adapter_config.json: not
    found", adapters=b"..." iterated into numbers ("47/adapter_config.json: not found"), names=[Path] a TypeError
    (train() and HF PEFT take any os.PathLike)."""
    from edgepeft.errors import ConfigError

    class Where(os.PathLike):
        def __init__(self, path):
            self.path = path

        def __fspath__(self):
            return self.path

    name, adapter = next(iter(shared_export("bert")[1].items()))
    export([Where(adapter)], Where(str(tmp_path / "o")), names=["a"])
    assert Runtime(Where(str(tmp_path / "o"))).adapter_names == ["a"]
    for change, said in (({"adapters": os.fsencode(adapter)}, "export's adapters must be folder paths (strings, or "
                                                              "os.PathLike), got bytes"),
                         ({"base": Where(os.fsencode(adapter))}, "export's base must be a model folder or hub id (a "
                                                                  "string, or os.PathLike), got bytes"),
                         ({"names": [Where("b")]}, "export's names must be strings, got Where")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            export(**{"adapters": [adapter], "out": str(tmp_path / "p"), **change})
    with pytest.raises(ConfigError, match=re.escape("a path must be text (a string), not bytes; give os.fsdecode(path)")):
        Runtime(Where(os.fsencode(str(tmp_path / "o"))))
    assert os.listdir(tmp_path) == ["o"]


def test_numpy_values_of_a_config_are_saved_as_numbers(tiny_base, tmp_path):
    """rank_pattern {"q_proj": np.int64(2)} was saved as "2" (json's default=str): neither edgepeft nor HF PEFT
    loaded the adapter again."""
    import json

    import peft

    import edgepeft
    from tiny import load_reference_base

    base = tiny_base("llama")
    config = edgepeft.LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": np.int64(2)},
                                 task_type="CAUSAL_LM")
    edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), config).save_pretrained(str(tmp_path / "a"))
    with open(tmp_path / "a" / "adapter_config.json") as f:
        assert json.load(f)["rank_pattern"] == {"q_proj": 2}
    peft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))
    edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(tmp_path / "a"))


def test_get_peft_model_and_keyword_typos_are_refused_as_hf_peft_refuses_them(tiny_base):
    """get_peft_model(model, None) made every base weight trainable and saved nothing; on a PeftModel it nested one
    in another (a saved adapter no library loads); a misspelt keyword was told "HF PEFT's, not taken; leave it out"
    (is_trainabel=True left out: the adapter loaded frozen)."""
    import edgepeft
    from edgepeft.errors import ConfigError
    from tiny import load_reference_base

    model = load_reference_base(tiny_base("llama"), "causal-lm")
    with pytest.raises(ConfigError, match=r"^config must be a PEFT config such as edgepeft.LoraConfig\(...\) \(or HF PEFT's\), got NoneType$"):
        edgepeft.get_peft_model(model, None)
    config = edgepeft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft_model = edgepeft.get_peft_model(model, config)
    with pytest.raises(ConfigError, match=r"the model is a PeftModel already; add this adapter to it with "):
        edgepeft.get_peft_model(peft_model, config)
    with pytest.raises(ConfigError, match=r"^get_peft_model\(adapter_nmae=...\): no such argument; did you mean "
                                          r"adapter_name=\?$"):
        edgepeft.get_peft_model(model, config, adapter_nmae="x")
    with pytest.raises(ConfigError, match=r"^from_pretrained\(device_map=...\): HF PEFT's, not taken by edgepeft's"):
        edgepeft.PeftModel.from_pretrained(model, "unused", device_map="auto")  # HF PEFT's (accelerate's): not a typo


def test_a_config_field_set_after_the_config_was_made_is_checked(tiny_base):
    """cfg.r = 8.7 built rank 8 and saved r 8.7 (a folder edgepeft then refused); cfg.r = 0 was a ZeroDivisionError.
    HF PEFT raises on each where the layer is made."""
    import edgepeft
    from edgepeft.errors import ConfigError, EdgePeftError
    from tiny import load_reference_base

    model = load_reference_base(tiny_base("llama"), "causal-lm")
    for value, error, said in ((8.7, ConfigError, "r = 8.7 is not a valid whole number"),
                               (True, ConfigError, "r = True is not a valid whole number"), (0, EdgePeftError, "r")):
        config = edgepeft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
        config.r = value
        with pytest.raises(error, match=re.escape(said)):
            edgepeft.get_peft_model(model, config)


def test_numpy_options_a_path_for_a_tokenizer_and_a_model_path_are_taken_or_named(text_model, tmp_path):
    """train(options={"r": np.int64(4)}) was refused as no number; a pathlib.Path as a prompt's tokenizer was
    "'PosixPath' object is not callable" (HF PEFT passes it to AutoTokenizer, which takes it); a model's path given
    to get_peft_model said "target_modules is required for model type None" (from_pretrained: torch's `_modules`)."""
    import json
    import pathlib

    import edgepeft
    from edgepeft.errors import ConfigError
    from edgepeft.training import train
    from tiny import load_reference_base
    from training_helpers import seq_cls_rows
    from file_checks import write_lines

    model = text_model("llama")
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    train(model=model, task="seq-cls", data=data, out=str(tmp_path / "a"), epochs=1, progress=False,
          options={"r": np.int64(2), "lora_alpha": np.float32(4), "target_modules": [np.str_("q_proj")]})
    with open(tmp_path / "a" / "adapter_config.json") as f:
        saved = json.load(f)
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (2, 4, ["q_proj"])
    base = load_reference_base(model, "causal-lm")
    configs = [edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT",
                                           prompt_tuning_init_text="good day", tokenizer_name_or_path=tok)
               for tok in (model, pathlib.Path(model))]
    prompts = [[p for p in edgepeft.get_peft_model(base, c).parameters() if p.requires_grad] for c in configs]
    assert len(prompts[0]) == 1 and torch.equal(prompts[0][0], prompts[1][0]) and configs[1].to_dict()["tokenizer_name_or_path"] == model
    with pytest.raises(ConfigError, match=r"^tokenizer_name_or_path=5: prompt_tuning_init='TEXT' needs a tokenizer"):
        edgepeft.get_peft_model(base, edgepeft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="x",
            tokenizer_name_or_path=5))
    said = re.escape(f"model must be a loaded transformers model, got str {model!r}; load it first, e.g. "
                     "transformers.AutoModelForCausalLM.from_pretrained(path), and pass that")
    with pytest.raises(ConfigError, match=f"^{said}$"):
        edgepeft.get_peft_model(model, edgepeft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=f"^{said}$"):
        edgepeft.PeftModel.from_pretrained(model, str(tmp_path / "a"))


def test_edgepefts_warnings_point_at_the_callers_line(tiny_base, peft_adapter, tmp_path):
    """Export's notes and a config's unknown fields warned at a line inside edgepeft: a warnings filter by module, or
    the shown line, named edgepeft's code and not the app's call."""
    import shutil
    import warnings

    import edgepeft
    from edgepeft.errors import EdgePeftWarning
    from file_checks import edit_json
    from peft_refs import spec_adapter

    folder = shutil.copytree(spec_adapter(peft_adapter, "llama", "qv"), tmp_path / "qv")
    edit_json(folder / "adapter_config.json", a_field_of_tomorrow=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        edgepeft.load_config(str(folder))
        export([str(folder)], str(tmp_path / "out"))
    ours = [w for w in seen if issubclass(w.category, EdgePeftWarning)]
    assert len(ours) >= 2 and {w.filename for w in ours} == {__file__}, [(w.filename, str(w.message)) for w in ours]


def test_input_folders_whose_names_are_not_utf8_are_told_to_rename_them(shared_export, tiny_base, tmp_path):
    """A paths hunt: an --adapter, --base or --model folder named in Latin-1 bytes (an old archive) was blamed on its
    files ("damaged or cut short; download the adapter again", "download them again", "save a tokenizer beside the
    model"): safetensors and tokenizers open UTF-8 paths only, and renaming is the fix, as OUT's message says."""
    import shutil

    import edgepeft
    from edgepeft.errors import ConfigError

    adapter = next(iter(shared_export("llama")[1].values()))
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    shutil.copytree(adapter, odd + "-adapter")
    shutil.copytree(tiny_base("llama"), odd + "-base")
    rename = re.escape(repr(odd)[:-1] + "-") + r"(adapter|base)': a name in this path is not UTF-8 .*; rename it$"
    for call in (lambda: export([odd + "-adapter"], str(tmp_path / "a"), names=["ok"]),
                 lambda: export([adapter], str(tmp_path / "b"), base=odd + "-base"),
                 lambda: edgepeft.train(model=odd + "-base", task="causal-lm", data=str(tmp_path / "d.jsonl"),
                                        out=str(tmp_path / "c"))):
        with pytest.raises(ConfigError, match=rename):
            call()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(odd) + s for s in ("-adapter", "-base"))


def test_a_suggested_out_beside_a_long_named_folder_fits_a_file_name(shared_export, tmp_path):
    """A paths hunt: an adapter folder named with 84 CJK characters (252 bytes) given as OUT was told `--out
    <folder>-onnx`, past a file name's 255 bytes: pasted, "File name too long"."""
    import shlex
    import shutil

    from edgepeft.errors import ConfigError

    adapter = shutil.copytree(next(iter(shared_export("llama")[1].values())), tmp_path / ("意图" * 42))
    with pytest.raises(ConfigError) as e:
        export([str(adapter)], str(adapter), names=["intent"])
    fresh = shlex.split(str(e.value).split("e.g. --out ")[1])[0]
    assert len(os.path.basename(fresh).encode()) <= 255 and fresh.endswith("-onnx"), str(e.value)
    export([str(adapter)], fresh, names=["intent"])  # pasted, it works
    assert Runtime(fresh).adapter_names == ["intent"]


def test_an_out_that_starts_with_a_tilde_no_shell_expanded_is_refused(shared_export, tiny_base, tmp_path, monkeypatch):
    """A paths hunt: `--out=~/x` (bash expands no '~' after '=') made a folder named ~ in the working folder and said
    "wrote ~/x" (a later `rm -rf ~` is the classic accident); --base and --model were told already."""
    import edgepeft
    from edgepeft.errors import ConfigError
    from edgepeft.files import check_output_files

    monkeypatch.chdir(tmp_path)
    said = re.escape(f"~/x: '~' is not expanded here; give --out the full path, {os.path.expanduser('~/x')}")
    with pytest.raises(ConfigError, match=said):
        export([next(iter(shared_export("bert")[1].values()))], "~/x")
    with pytest.raises(ConfigError, match=said):
        edgepeft.train(model=tiny_base("bert"), task="seq-cls", data=str(tmp_path / "d.jsonl"), out="~/x")
    with pytest.raises(ConfigError, match=said.replace("\\-\\-out", "\\-\\-json")):  # bench --json=~/x, --plot alike
        check_output_files({"--json": "~/x"})
    from edgepeft.errors import ArtifactNotFoundError  # a later paths hunt: "not found" (Runtime, run, inspect, bench:
    for call, flag in ((lambda: Runtime("~/x"), "it"), (lambda: export(["~/x"], "o"), "--adapter"),  # "export there
                       (lambda: edgepeft.train(model=tiny_base("bert"), task="seq-cls", data="~/x", out="o"), "it")):
        with pytest.raises(ArtifactNotFoundError, match=said.replace("\\-\\-out", flag)):  # first with --out ~/x")
            call()
    assert os.listdir(tmp_path) == []
    os.mkdir("~")  # a folder of that name, made on purpose, is a folder like any other
    export([next(iter(shared_export("bert")[1].values()))], "~/x")
    assert os.listdir(tmp_path / "~") == ["x"]


def test_an_adapter_named_as_a_windows_device_is_refused_with_a_name_that_copies(shared_export, tmp_path):
    """A paths hunt: an adapter named aux (or CON, nul, com1...) was written as OUT/adapters/aux, a folder no Windows
    system can hold (deploy.md's targets: OUT copied there lost it), as names differing in case only are refused."""
    import shutil

    from edgepeft.errors import ConfigError

    adapter = shutil.copytree(next(iter(shared_export("bert")[1].values())), tmp_path / "aux")
    with pytest.raises(ConfigError, match=r"adapter name 'aux' is a device's name on Windows, where no folder can take "
                                          r"it; pass --name \(e.g. --name aux_adapter\)$"):
        export([str(adapter)], str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"'COM1' is a device's name on Windows.*--name COM1_adapter\)$"):
        export([str(adapter)], str(tmp_path / "out"), names=["COM1"])
    export([str(adapter)], str(tmp_path / "out"), names=["aux_adapter"])
    assert Runtime(str(tmp_path / "out")).adapter_names == ["aux_adapter"]


def test_an_option_value_read_as_json_into_the_wrong_type_names_how_to_write_it(text_model, tmp_path, capsys):
    """A hunt: --option VALUE is read as JSON, so 123 is a number and True or lm_head are text; "is not a valid
    bool" named no fix. Each fix given is followed."""
    import shlex

    from file_checks import write_lines
    from training_helpers import cli_error, cli_ok

    data = write_lines(tmp_path / "d.jsonl", [{"text": f"say {w}"} for w in ("yes", "no", "maybe", "so")])
    argv = ["train", "--model", text_model("llama"), "--task", "causal-lm", "--data", data, "--epochs", "1",
            "--batch-size", "2", "--quiet", "--out", tmp_path / "a", "--option"]
    for given, said in (("use_rslora=True", "; write true (JSON, unquoted; in Python True)"),
                        ("use_rslora=1", "; write true or false (JSON, unquoted; in Python True or False)"),  # a review
                        ("modules_to_save=lm_head", "; give a list: [\"lm_head\"] (at the command line in single quotes: "
                                                    "--option 'modules_to_save=[\"lm_head\"]')")):
        line = cli_error(capsys, *argv, given)
        assert line.endswith(said) and not (tmp_path / "a").exists()
    cli_ok(capsys, *argv[:-1], *shlex.split(said.rpartition("quotes: ")[2][:-1]), "--option", "use_rslora=true")
    line = cli_error(capsys, *argv[:-3], "--method", "prompt", "--out", tmp_path / "b", "--option",
                     "prompt_tuning_init_text=123")
    assert line.endswith("is not a valid str or null; give it as text: \"123\" (at the command line in single quotes: "
                         "--option 'prompt_tuning_init_text=\"123\"')")


def test_run_given_two_adapters_is_refused_not_served_by_the_last(shared_export, capsys):
    """A CLI hunt: `run --adapter A --adapter B` printed what B alone gives, saying nothing (click keeps the last)."""
    from training_helpers import cli_error

    out = shared_export("llama")[0]
    assert cli_error(capsys, "run", out, "x", "--adapter", "qv", "--adapter", "none") == (
        "error: --adapter given 2 times (qv, none); give one --adapter (a batch of rows each with its adapter: "
        "Runtime's adapter=[...], from Python)")


def test_an_adapter_recording_a_base_of_a_type_edgepeft_does_not_load_names_the_fix_with_base(tiny_base, tmp_path):
    """An archs hunt: an adapter made on a Mistral (sliding_window null: Llama's computation), exported with --base a
    copy relabelled llama, was refused by the recorded base's type alone, with no fix that applies to --base."""
    import json
    import shutil

    from peft_refs import lora_adapter
    from edgepeft.errors import UnsupportedModelError

    mistral = shutil.copytree(tiny_base("llama"), tmp_path / "mistral")
    config = json.loads((mistral / "config.json").read_text())
    (mistral / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    adapter = lora_adapter(tmp_path / "adapter", tiny_base("llama"), "causal-lm", 3, r=2, target_modules=["q_proj"])
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**settings,
                                                                          "base_model_name_or_path": str(mistral)}))
    with pytest.raises(UnsupportedModelError, match=re.escape(
            f"model type 'mistral' is not supported; edgepeft supports bert, gpt2, llama, qwen2 (Llama, Qwen2, GPT-2, and"
            f" BERT: model_type bert, such as MiniLM); where --base is that model, set base_model_name_or_path to it in "
            f"{adapter}'s adapter_config.json")):
        export([adapter], str(tmp_path / "out"), base=tiny_base("llama"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**settings,  # the fix, as it says
                                                                          "base_model_name_or_path": tiny_base("llama")}))
    export([adapter], str(tmp_path / "out"), base=tiny_base("llama"))


def test_a_file_where_the_base_folder_belongs_is_named_with_the_fix_that_works(shared_export, tmp_path):
    """A jsparity hunt: Python said "no exported base here; run edgepeft export ... first", which export refused (OUT/base
    is a file); the JS runtime's words, as here, work."""
    from edgepeft.errors import ArtifactNotFoundError

    out = tmp_path / "out"
    out.mkdir()
    (out / "base").write_text("not a folder")
    with pytest.raises(ArtifactNotFoundError, match="base: a file where the export has a folder; remove it and export again$"):
        Runtime(str(out))
    os.remove(out / "base")  # as it says
    export([next(iter(shared_export("bert")[1].values()))], str(out))
    assert Runtime(str(out)).adapter_names
