"""edgepeft train on bad input: a clear one-line error naming the file (and line), nothing lost.

Every user-facing failure raises an ``EdgePeftError`` subclass; ``edgepeft train`` prints
it as one ``error:`` line, exits 1, never a traceback; an earlier run's adapter and
checkpoint in --out stay byte-identical. Most checks fail before a model loads; the
resume and export checks share one tiny training run (1 epoch, 16 rows, the tiny BERT
with a BPE tokenizer of the text_model fixture). Nothing is downloaded.

"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from edgepeft.cli import main
from edgepeft.errors import ConfigError, CorruptArtifactError, EdgePeftError
from edgepeft.training import Trainer, TrainingArguments, method_config
from edgepeft.tuners import methods
from file_checks import tree_hashes, write_lines
from training_helpers import REPO, cli_error, cli_ok, seq_cls_rows, train_argv


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def bad_row_run(tmp_path_factory, tiny_base):
    """`python -m edgepeft train` on a file whose line 5 lacks "label", started in the background (it spends
    its seconds importing torch) and read by test_cli_bad_data_row_one_line_with_file_and_line."""
    root = tmp_path_factory.mktemp("bad-row")
    data = write_lines(root / "train.jsonl", seq_cls_rows(4) + [{"text": "no label here"}])
    out = str(root / "out")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "edgepeft", "train", "--model", tiny_base("bert"), "--task", "seq-cls",
                             "--data", data, "--out", out, "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    yield proc, data, out
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def tiny_bert(text_model):
    """A tiny BERT with a BPE tokenizer learned from the sample texts (shared with test_training.py)."""
    return text_model("bert")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_lines(tmp_path_factory.mktemp("train-data") / "train.jsonl", seq_cls_rows())


@pytest.fixture(scope="module")
def trained(tiny_bert, train_file, tmp_path_factory):
    """One tiny `edgepeft train` run: its --out holds the adapter, labels.json, log, curve and a checkpoint."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    main([str(a) for a in train_argv(tiny_bert, train_file, out)])
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(out, "checkpoint", "trainer_state.pt"))
    return out


# --------------------------------------------------------------------------- TrainingArguments.check
def _targs(**kw):
    return TrainingArguments(**{"model": "m", "task": "seq-cls", "data": "d.jsonl", "out": "o", **kw})


@pytest.mark.parametrize("field, value, flag", [
    ("epochs", 0, "--epochs"), ("epochs", 1.5, "--epochs"), ("batch_size", 0, "--batch-size"),
    ("grad_accum", 0, "--grad-accum"), ("max_length", -1, "--max-length"), ("logging_steps", 0, "--logging-steps"),
    ("lr", 0.0, "--lr"), ("lr", -1e-4, "--lr"), ("lr", math.nan, "--lr"), ("lr", math.inf, "--lr"), ("lr", 1e39, "--lr"),
    ("weight_decay", -1.0, "--weight-decay"), ("weight_decay", math.nan, "--weight-decay"), ("weight_decay", 1e39, "--weight-decay"),
    ("warmup_ratio", 1.5, "--warmup-ratio"), ("warmup_ratio", -0.1, "--warmup-ratio"), ("warmup_ratio", math.nan, "--warmup-ratio"),
    ("scheduler", "step", "--scheduler"), ("mixed_precision", "fp8", "--mixed-precision"), ("save", "first", "--save"),
    ("task", "translation", "task"),
    ("seed", -1, "--seed"), ("seed", 2**32, "--seed"), ("seed", "0", "--seed"), ("seed", 1.0, "--seed"),
    ("epochs", True, "--epochs"), ("lr", "1e-3", "--lr"), ("head_lr", "1e-2", "--head-lr"), ("head_lr", 1e39, "--head-lr"),
    ("max_grad_norm", None, "--max-grad-norm"), ("warmup_ratio", "0.1", "--warmup-ratio"), ("options", None, "options"),
])
def test_check_rejects_bad_values(field, value, flag):
    with pytest.raises(ConfigError) as e:
        _targs(**{field: value}).check()
    msg = str(e.value)
    assert flag in msg and (repr(value) in msg or str(value) in msg), msg


def test_numpy_numbers_are_taken_as_python_numbers():
    """Values from a numpy sweep pass the checks and are written to the log and the checkpoint as plain JSON."""
    import numpy as np

    args = _targs(seed=np.int64(3), epochs=np.int32(2), lr=np.float32(0.5), warmup_ratio=np.float64(0.25))
    args.check()
    fingerprint = args.fingerprint()
    assert (fingerprint["seed"], fingerprint["epochs"], fingerprint["lr"], fingerprint["warmup_ratio"]) == (3, 2, 0.5, 0.25)
    assert type(args.seed) is int and type(args.lr) is float


def test_trainer_checks_its_arguments_on_construction():
    with pytest.raises(ConfigError, match="--epochs"):
        Trainer(model="m", task="seq-cls", data="d.jsonl", out="o", epochs=0)


def test_save_best_without_eval_data_falls_back_to_last():
    a = _targs(save="best")
    a.check()
    assert a.save == "last"
    b = _targs(save="best", eval_data="e.jsonl")
    b.check()
    assert b.save == "best"


@pytest.mark.parametrize("value", [-1.0, math.inf])
def test_check_rejects_a_max_grad_norm_below_0_or_infinite(value):  # a hunt: 0, transformers' "no clipping", too
    with pytest.raises(ConfigError, match=r"--max-grad-norm must be a finite number >= 0 \(0: no clipping\), .*; pass 1.0"):
        _targs(max_grad_norm=value).check()


# --------------------------------------------------------------------------- method_config
def test_unknown_method():
    with pytest.raises(ConfigError) as e:
        method_config("qlora", "seq-cls", {})
    known = sorted(m.name for m in methods())  # every registered method, so adding one keeps this test true
    assert {"bottleneck", "ia3", "lora"} <= set(known)
    assert "'qlora'" in str(e.value) and ", ".join(known) in str(e.value)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        method_config("lora", "seq-cls", {"rank": 4})
    msg = str(e.value)
    assert "'rank'" in msg and "its options are" in msg
    for name in ("r", "lora_alpha", "lora_dropout", "target_modules"):
        assert name in msg
    assert not any(f in msg for f in ("task_type", "peft_type", "use_dora", "lora_bias", "layers_"))  # hunt: refused ones


@pytest.mark.parametrize("field", ["task_type", "inference_mode", "base_model_name_or_path", "auto_mapping"])
def test_fields_training_sets_itself_are_no_options(field):
    """inference_mode=true froze the adapter: a traceback (no tensor requires grad) after loading the model."""
    with pytest.raises(ConfigError, match=f"ia3 has no option '{field}'"):
        method_config("ia3", "causal-lm", {field: "SEQ_CLS"})


def test_options_json_cannot_hold_are_saved_as_it_can_or_refused():
    """A set (HF PEFT takes them) or a tokenizer object: a TypeError from the checkpoint's JSON after loading."""
    tokenizer = type("Tokenizer", (), {"name_or_path": "/models/tok"})()
    args = TrainingArguments(model="m", task="causal-lm", data="d", out="o", method="prompt",
                             options={"target_modules": {"v", "q"}, "tokenizer_name_or_path": tokenizer})
    args.check()
    assert args.options == {"target_modules": ["q", "v"], "tokenizer_name_or_path": "/models/tok"}
    with pytest.raises(ConfigError, match="option init=<object .* cannot be saved in the training log and checkpoint"):
        TrainingArguments(model="m", task="causal-lm", data="d", out="o", options={"init": object()}).check()


def test_the_resume_command_gives_the_rates_as_they_were():
    """--lr 0.00166667 (printed with :g) was refused on resume: 'made with --lr 0.0016666666666666668'."""
    import shlex

    args = TrainingArguments(model="m", task="causal-lm", data="d", out="o", lr=5e-3 / 3, warmup_ratio=0.1 / 3)
    words = shlex.split(args.command("--resume"))
    assert float(words[words.index("--lr") + 1]) == args.lr
    assert float(words[words.index("--warmup-ratio") + 1]) == args.warmup_ratio
    assert "--quiet" not in words and "--logging-steps" not in words  # defaults: left out
    quiet = TrainingArguments(model="m", task="causal-lm", data="d", out="o", logging_steps=3, progress=False)
    words = shlex.split(quiet.command("--resume"))  # both were dropped: the resumed run logged every 10 steps
    assert words[words.index("--logging-steps") + 1] == "3" and "--quiet" in words and words[-1] == "--resume"


def test_path_arguments_give_the_resume_command():
    """edgepeft.train(data=Path(...)): Ctrl-C raised shlex's TypeError instead of TrainingInterrupted and its command."""
    import pathlib
    import shlex

    args = TrainingArguments(model=pathlib.Path("m"), task="causal-lm", data=pathlib.Path("my data.jsonl"),
                             eval_data=pathlib.Path("e.jsonl"), out=pathlib.Path("o"))
    args.check()
    words = shlex.split(args.command("--resume"))
    assert words[words.index("--data") + 1] == "my data.jsonl" and words[words.index("--eval") + 1] == "e.jsonl"


def test_a_torchrun_run_is_resumed_under_torchrun_and_reports_once(monkeypatch, capsys, tmp_path):
    """Ctrl-C under torchrun printed its line once per process, with a one-process command that the checkpoint
    refused ("was made by 2 training process(es)"); error lines too. Each process's goes to torchrun's report."""
    import shlex

    args = TrainingArguments(model="m", task="seq-cls", data="d", out="o", options={"r": 2})
    words = shlex.split(args.command("--resume", processes=2))
    assert words[:6] == ["torchrun", "--nproc-per-node", "2", "-m", "edgepeft", "train"] and words[-1] == "--resume"
    assert shlex.split(args.command("--resume"))[:2] == ["edgepeft", "train"]
    argv = ["train", "--model", str(tmp_path / "none"), "--task", "seq-cls", "--data", str(tmp_path / "d.jsonl"),
            "--out", str(tmp_path / "o")]
    for rank, lines in (("1", 0), ("0", 1)):  # each process's own line goes to torchrun's report ("Root Cause")
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"error{rank}.json"))
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 1 and len(capsys.readouterr().err.splitlines()) == lines
        with open(tmp_path / f"error{rank}.json") as f:
            assert json.load(f)["message"]["message"].startswith(f"error: {tmp_path / 'none'}: no such folder")


@pytest.mark.parametrize("name, cls_name", [("LORA", "LoraConfig"), ("Lora", "LoraConfig"), ("ia3", "IA3Config"),
                                            ("IA3", "IA3Config"), ("BOTTLENECK", "BottleneckConfig")])
def test_peft_style_method_names(name, cls_name):
    config = method_config(name, "causal-lm", {})
    assert type(config).__name__ == cls_name and config.task_type == "CAUSAL_LM"


def test_options_become_config_fields():
    config = method_config("lora", "seq-cls", {"r": 4, "lora_alpha": 16, "target_modules": ["query"]})
    assert (config.r, config.lora_alpha, config.target_modules, config.task_type) == (4, 16, ["query"], "SEQ_CLS")


@pytest.mark.parametrize("options, cls, words", [
    ({"r": "four"}, ConfigError, "invalid lora options {'r': 'four'}"),
    ({"r": 2.5}, ConfigError, "r = 2.5 is not a valid whole number"),
    ({"lora_alpha": math.nan}, ConfigError, "lora_alpha = nan is not a valid finite number"),
    ({"r": 0}, EdgePeftError, "r must be positive"),
    ({"use_dora": True}, EdgePeftError, "use_dora"),
])
def test_bad_option_value(options, cls, words):
    with pytest.raises(cls) as e:
        method_config("lora", "seq-cls", options)
    assert words in str(e.value)


def test_a_wrong_typed_option_of_another_method_is_named():
    with pytest.raises(ConfigError, match="bottleneck_size = 'big' is not a valid whole number"):
        method_config("bottleneck", "seq-cls", {"bottleneck_size": "big"})


def test_a_diverging_run_stops_with_a_clear_error(tiny_bert, train_file, tmp_path, monkeypatch):
    """A NaN loss (as a far too high --lr gives) ends the run with an error, not an 'ok' over a broken adapter."""
    real = Trainer._loss

    def nan_loss(self, model, batch):
        loss, logits = real(self, model, batch)
        return loss * math.nan, logits

    monkeypatch.setattr(Trainer, "_loss", nan_loss)  # private: no data makes the loss NaN on demand
    with pytest.raises(ConfigError, match=r"diverged at step 1 .*loss is nan; lower --lr .*; no adapter was saved"):
        Trainer(model=tiny_bert, task="seq-cls", data=train_file, out=str(tmp_path / "out"), epochs=1,
                logging_steps=1, progress=False).train()


# --------------------------------------------------------------------------- CLI (fails before a model loads)
def test_cli_missing_data_file(tmp_path, tiny_base, capsys):
    missing = tmp_path / "nope.jsonl"
    line = cli_error(capsys, "train", "--model", tiny_base("bert"), "--task", "causal-lm", "--data", missing,
                     "--out", tmp_path / "out", "--quiet")
    assert str(missing) in line and "not found" in line
    assert not (tmp_path / "out").exists()


def test_cli_lora_shorthand_with_another_method(tmp_path, tiny_base, capsys):
    line = cli_error(capsys, "train", "--model", tiny_base("bert"), "--task", "seq-cls", "--data", tmp_path / "d.jsonl",
                     "--out", tmp_path / "out", "--method", "ia3", "--r", "4")
    assert "--r is not an option of ia3" in line and "--option KEY=VALUE" in line


@pytest.mark.parametrize("pair", ["lora_dropout", "=0.1"])
def test_cli_option_without_key_value(tmp_path, tiny_base, capsys, pair):
    line = cli_error(capsys, "train", "--model", tiny_base("bert"), "--task", "seq-cls", "--data", tmp_path / "d.jsonl",
                     "--out", tmp_path / "out", "--option", pair)
    assert repr(pair) in line and "KEY=VALUE" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is valid on a CUDA machine")
def test_cli_fp16_on_cpu(tmp_path, tiny_base, capsys):
    data = write_lines(tmp_path / "train.jsonl", seq_cls_rows(4))
    line = cli_error(capsys, "train", "--model", tiny_base("bert"), "--task", "seq-cls", "--data", data,
                     "--out", tmp_path / "out", "--mixed-precision", "fp16", "--quiet")
    assert "fp16" in line and "CUDA" in line and "bf16 or no" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CLI with the tiny tokenizer model
def test_cli_eval_label_not_in_training(tmp_path, tiny_bert, train_file, capsys):
    evals = write_lines(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"}, "", {"text": "y", "label": "unseen"}])
    line = cli_error(capsys, "train", "--model", tiny_bert, "--task", "seq-cls", "--data", train_file, "--eval", evals,
                     "--out", tmp_path / "out", "--quiet")
    assert f"{evals}:3:" in line and "'unseen'" in line
    assert not (tmp_path / "out").exists()


def test_cli_unknown_option_field_lists_options(tmp_path, tiny_bert, train_file, capsys):
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, tmp_path / "out", "--option", "rank=4"))
    assert "'rank'" in line and "its options are" in line
    assert not (tmp_path / "out").exists()


def test_cli_encoder_model_for_causal_lm(tmp_path, tiny_bert, capsys):
    data = write_lines(tmp_path / "lm.jsonl", [{"text": "hello there"}])
    line = cli_error(capsys, "train", "--model", tiny_bert, "--task", "causal-lm", "--data", data,
                     "--out", tmp_path / "out", "--quiet")
    assert tiny_bert in line and "causal-LM" in line
    assert not (tmp_path / "out").exists()


def test_cli_model_without_tokenizer(tmp_path, tiny_base, train_file, capsys):
    model = tiny_base("bert")  # config + weights only
    line = cli_error(capsys, *train_argv(model, train_file, tmp_path / "out"))
    assert model in line and "tokenizer" in line


@pytest.mark.parametrize("pair", ["lora_dropout=1.5", 'lora_alpha="x"'])
def test_cli_bad_option_value_is_one_line(tmp_path, tiny_bert, train_file, capsys, pair):
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, tmp_path / "out", "--option", pair))
    assert pair.split("=")[0] in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- resume / overwrite rules
def test_resume_without_checkpoint(tmp_path, tiny_bert, train_file, capsys):
    out = tmp_path / "fresh"
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, out, "--resume"))
    assert str(out) in line and "no checkpoint to resume from" in line and "without --resume" in line
    assert not out.exists()


def test_resume_without_checkpoint_api(tmp_path, tiny_bert, train_file):
    with pytest.raises(ConfigError, match="no checkpoint"):
        Trainer(model=tiny_bert, task="seq-cls", data=train_file, out=str(tmp_path / "o"), resume=True,
                progress=False).train()


def test_second_run_into_same_out_is_refused_and_loses_nothing(trained, tiny_bert, train_file, capsys):
    before = tree_hashes(trained)
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, trained))
    assert trained in line and "--resume" in line and "--overwrite" in line and "another --out" in line
    assert tree_hashes(trained) == before


@pytest.mark.parametrize("flag, value, setting", [("--lr", "1e-3", "lr"), ("--epochs", "2", "epochs"),
                                                  ("--seed", "1", "seed"), ("--batch-size", "4", "batch_size")])
def test_resume_with_changed_setting_names_it(trained, tiny_bert, train_file, capsys, flag, value, setting):
    before = tree_hashes(trained)
    argv = train_argv(tiny_bert, train_file, trained, "--resume")
    i = argv.index(flag) if flag in argv else None
    if i is None:
        argv += [flag, value]
    else:
        argv[i + 1] = value
    line = cli_error(capsys, *argv)
    # the CLI names the flag, not the Python setting: "was made with --lr 0.002, this run has --lr 0.001"
    assert os.path.join(trained, "checkpoint") in line and f"with {flag} " in line and f"{setting}=" not in line
    assert "--overwrite" in line
    assert tree_hashes(trained) == before


def test_resume_with_changed_lora_rank_names_the_flag(trained, tiny_bert, train_file, capsys):
    """The method's option that differs, in the command's terms (not the whole options dict, half rewritten)."""
    before = tree_hashes(trained)
    argv = train_argv(tiny_bert, train_file, trained, "--resume")
    argv[argv.index("--r") + 1] = "4"
    line = cli_error(capsys, *argv)
    assert line.endswith("checkpoint: was made with --r 2, this run has --r 4; resume with the same settings or start "
                         "over with --overwrite")
    assert tree_hashes(trained) == before


@pytest.mark.parametrize("change", ["renamed", "added"])
def test_resume_on_data_whose_labels_changed_is_refused(tiny_bert, tmp_path, capsys, change):
    """A label renamed in the data trained its rows as the other class under the checkpoint's old names (accuracy
    0.93 -> 0.27 through labels.json, then `ok:`); one added was a size-mismatch traceback."""
    data = write_lines(tmp_path / "train.jsonl", seq_cls_rows())
    out = str(tmp_path / "run")
    cli_ok(capsys, *train_argv(tiny_bert, data, out))
    rows = seq_cls_rows() + ([{"text": "sample sounds odd", "label": "odd"}] if change == "added" else [])
    write_lines(data, [dict(r, label="zz_neg") if r["label"] == "neg" else r for r in rows] if change == "renamed"
                else rows)
    before = tree_hashes(out)
    line = cli_error(capsys, *train_argv(tiny_bert, data, out, "--resume"))
    now = ["pos", "zz_neg"] if change == "renamed" else ["neg", "odd", "pos"]
    assert line == (f"error: {os.path.join(out, 'checkpoint')}: was made with the labels ['neg', 'pos'], {data} now "
                    f"gives {now}; resume with the data it was made with or start over with --overwrite")
    assert tree_hashes(out) == before


def test_overwrite_run_that_fails_on_data_loses_nothing(trained, tiny_bert, tmp_path, capsys):
    before = tree_hashes(trained)
    bad = write_lines(tmp_path / "bad.jsonl", seq_cls_rows(3) + ["{broken"])
    line = cli_error(capsys, *train_argv(tiny_bert, bad, trained, "--overwrite"))
    assert f"{bad}:4:" in line
    assert tree_hashes(trained) == before


def test_overwrite_run_that_fails_on_options_loses_nothing(trained, tiny_bert, train_file, capsys):
    before = tree_hashes(trained)
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, trained, "--overwrite", "--option", "nope=1"))
    assert "'nope'" in line
    assert tree_hashes(trained) == before


def test_resume_with_same_settings_is_accepted(trained, tiny_bert, train_file, capsys):
    """Control: the refusals above are about the settings; --quiet may change on resume. The run is complete."""
    files = ["adapter_model.safetensors", "adapter_config.json", "labels.json"]
    before = {f: tree_hashes(trained)[f] for f in files}
    argv = [a for a in train_argv(tiny_bert, train_file, trained, "--resume") if a != "--quiet"]
    assert "ok: adapter in" in cli_ok(capsys, *argv)
    after = tree_hashes(trained)
    assert {f: after[f] for f in files} == before


def test_resume_from_corrupt_checkpoint(trained, tiny_bert, train_file, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    state = out / "checkpoint" / "trainer_state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    before = tree_hashes(out)
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, out, "--resume"))
    assert "trainer_state.pt" in line or os.path.join(str(out), "checkpoint") in line
    assert tree_hashes(out) == before


def test_resume_refuses_a_checkpoint_that_would_run_code(trained, tiny_bert, train_file, tmp_path, capsys):
    """trainer_state.pt loads with torch.load(weights_only=True): a pickled object is refused, never called."""
    import torch

    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    state = out / "checkpoint" / "trainer_state.pt"
    good = torch.load(state, weights_only=True)  # what edgepeft writes loads safely
    torch.save({**good, "hook": _Payload()}, state)
    before = tree_hashes(out)
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, out, "--resume"))
    assert "trainer_state.pt" in line and "--overwrite" in line
    assert tree_hashes(out) == before and not _Payload.ran


class _Payload:
    ran = False

    def __reduce__(self):
        return (_Payload._run, ())

    @staticmethod
    def _run():
        _Payload.ran = True


def test_out_is_an_existing_file(tmp_path, tiny_bert, train_file, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, out))
    assert str(out) in line
    assert out.read_text() == "keep me"


# --------------------------------------------------------------------------- export: labels.json beside an adapter
@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained adapter (no checkpoint) exported once; returns (adapter dir, export OUT)."""
    from edgepeft.exporters import export

    root = tmp_path_factory.mktemp("labels-export")
    good = root / "good"
    shutil.copytree(trained, good, ignore=shutil.ignore_patterns("checkpoint", "training_*"))
    out = root / "out"
    export([str(good)], str(out))
    with open(out / "adapters" / "good" / "adapter.json", encoding="utf-8") as f:
        assert json.load(f)["labels"] == ["neg", "pos"]  # the valid file is read; the bad ones below fail on it
    return good, out


@pytest.mark.parametrize("content, words", [
    (b"{ not json", "cannot read the label names"),
    (b'["neg", "pos"]', "cannot read the label names"),  # no "labels" key
    (b"null", "cannot read the label names"),
    (b'{"labels": "neg,pos"}', "list of strings"),
    (b'{"labels": [0, 1]}', "list of strings"),
    (b'{"labels": ["neg", null]}', "list of strings"),
    (b'{"labels": ["neg", "pos", "maybe"]}', "names 3 labels but the adapter's classifier has 2 outputs"),
    (b'{"labels": []}', "names 0 labels"),
    (b'{"labels": ["n\xe9g", "pos"]}', "cannot read the label names"),  # not UTF-8
])
def test_export_rejects_bad_labels_json(exported, tmp_path, content, words):
    from edgepeft.exporters import export

    good, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "labels.json").write_bytes(content)
    before = tree_hashes(out)
    with pytest.raises(CorruptArtifactError) as e:
        export([str(bad)], str(out))
    msg = str(e.value)
    assert str(bad / "labels.json") in msg and words in msg and "fix or delete the file" in msg
    assert tree_hashes(out) == before  # the failed export added and changed nothing


def test_cli_export_bad_labels_json_is_one_line(exported, tmp_path, capsys):
    good, out = exported
    bad = tmp_path / "cls"
    shutil.copytree(good, bad)
    (bad / "labels.json").write_text(json.dumps({"labels": ["a", "b", "c", "d"]}))
    before = tree_hashes(out)
    line = cli_error(capsys, "export", "--adapter", bad, "--out", out)
    assert str(bad / "labels.json") in line and "4 labels" in line
    assert tree_hashes(out) == before


# --------------------------------------------------------------------------- process-wide state
def test_second_run_in_process_with_other_mixed_precision(trained, tiny_bert, train_file, tmp_path):
    import edgepeft

    # `trained` used --mixed-precision auto: bf16 on a CUDA GPU that has it, else no. Ask for the other one.
    other = "no" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "bf16"
    log = edgepeft.train(model=tiny_bert, task="seq-cls", data=train_file, out=str(tmp_path / "o"), epochs=1,
                         batch_size=8, max_length=32, mixed_precision=other, progress=False,
                         options={"r": 2, "target_modules": ["query", "value"]})
    assert log["mixed_precision"] == other  # the second run's own precision, not the first run's
    assert all(math.isfinite(h["loss"]) for h in log["history"]) and log["history"]


# --------------------------------------------------------------------------- last: the background subprocess
def test_cli_bad_data_row_one_line_with_file_and_line(bad_row_run):
    """As users run it: a subprocess (started when the module starts), so a traceback would really show."""
    proc, data, out = bad_row_run
    stdout, stderr = proc.communicate(timeout=180)
    assert "Traceback" not in stdout + stderr, stderr
    assert proc.returncode == 1, (proc.returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert f"{data}:5:" in errors[0] and '"label"' in errors[0]
    assert stdout == ""
    assert not os.path.exists(out)


def test_cli_all_linear_ignores_case():
    from edgepeft.flags import method_options

    assert method_options("lora", None, None, "ALL-LINEAR", ())["target_modules"] == "ALL-LINEAR"
    assert method_options("lora", None, None, "q_proj,v_proj", ())["target_modules"] == ["q_proj", "v_proj"]


# --------------------------------------------------------------------------- refused before any training
def test_a_namespaced_hub_id_goes_to_the_hub(capsys, train_file, tmp_path):
    """`org/name` with no such local folder is a hub id, as transformers takes it (offline here: it says it cannot
    load it, not that the folder is missing)."""
    line = cli_error(capsys, "train", "--model", "sentence-transformers/all-MiniLM-L6-v2", "--task", "seq-cls",
                     "--data", train_file, "--out", tmp_path / "o")
    assert line.startswith("error: sentence-transformers/all-MiniLM-L6-v2: cannot load the base model's config")
    assert "no such folder" not in line and not (tmp_path / "o").exists()


def test_rows_past_the_models_positions_are_refused_before_training(capsys, text_model, tmp_path):
    """The tiny GPT-2 has 128 learned positions: a 200-token row at the default --max-length 256 would crash
    inside torch; it is refused naming the row and a --max-length that works, and no OUT is left behind."""
    rows = seq_cls_rows(8) + [{"text": " ".join(["battery"] * 200), "label": "pos"}]
    data = write_lines(tmp_path / "long.jsonl", rows)
    argv = ["train", "--model", text_model("gpt2"), "--task", "seq-cls", "--data", data, "--out", tmp_path / "o",
            "--epochs", "1", "--quiet"]
    line = cli_error(capsys, *argv)
    assert line.startswith(f"error: {data}:9: ") and "exceed the model's 128 positions; pass --max-length 128 or less" in line
    assert not (tmp_path / "o").exists()
    line = cli_error(capsys, *argv, "--method", "prompt", "--option", "num_virtual_tokens=100", "--max-length", "64")
    assert line == (f"error: {data}:9: 64 tokens + 100 virtual tokens exceed the model's 128 positions; pass "
                    "--max-length 28 or less")
    cli_ok(capsys, *argv, "--max-length", "128")  # the fix it names works
    assert os.path.isfile(tmp_path / "o" / "adapter_model.safetensors")


def test_prefix_on_a_decoder_classifier_is_refused_before_training(capsys, text_model, train_file, tmp_path):
    line = cli_error(capsys, "train", "--model", text_model("gpt2"), "--task", "seq-cls", "--method", "prefix",
                     "--data", train_file, "--out", tmp_path / "o", "--quiet")
    assert "prefix tuning on a decoder (gpt2) runs and exports for causal-lm only" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["checkpoint/notes.txt", "training_log.json", "labels.json"])
def test_files_of_the_users_where_training_writes_are_kept(capsys, tiny_bert, train_file, tmp_path, name):
    """Not an earlier run's: a checkpoint/ folder or a training_log.json of the user's is not replaced silently."""
    out = tmp_path / "proj"
    (out / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
    (out / name).write_text("mine")
    before = tree_hashes(out)
    line = cli_error(capsys, *train_argv(tiny_bert, train_file, str(out)))
    written = out / name.split("/")[0]
    assert line == f"error: {written}: training writes there; move it, pass --overwrite to replace it, or give another --out"
    assert tree_hashes(out) == before


def test_train_names_a_keyword_it_does_not_take():
    """edgepeft.train(r=2) (a CLI flag) was a TypeError: 'unexpected keyword argument'."""
    import edgepeft

    with pytest.raises(ConfigError, match=r"edgepeft.train takes no eval, r; for eval use eval_data=; a method's own "
                       r"settings \(r, lora_alpha, target_modules, ...\) go in options=\{...\}, the rest are "
                       r"TrainingArguments' fields: batch_size, data, "):
        edgepeft.train(model="m", task="seq-cls", data="d", out="o", r=2, eval="e.jsonl")
