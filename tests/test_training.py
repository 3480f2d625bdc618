"""edgepeft train: real training runs on the sample data and tiny models.

The accuracy test trains on the real MiniLM-L6 weights; the rest use tiny models
with a small BPE tokenizer learned from the sample texts. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from click.testing import CliRunner
from file_checks import edit_json
from training_helpers import finished

from edgepeft.cli import cli
from edgepeft.errors import ConfigError, TrainingInterrupted
from edgepeft.training import Trainer, TrainingArguments, method_config, train
from edgepeft.training import trainer as training_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "samples", "data")


def _minilm() -> str:
    import edgepeft

    return edgepeft.minilm_path()


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _rows(name, n=None):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def trained_intent(workdir):
    """A LoRA intent classifier trained on the real MiniLM-L6 weights (2 epochs, held-out eval)."""
    out = str(workdir / "train-intent")
    log = train(model=_minilm(), task="seq-cls", method="lora", data=os.path.join(DATA, "intent_train.jsonl"),
                eval_data=os.path.join(DATA, "intent_eval.jsonl"), out=out, epochs=2, lr=1e-3, batch_size=16,
                options={"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]},
                logging_steps=5, progress=False)
    return out, log


@pytest.mark.slow
def test_training_gives_a_clear_accuracy_gain_on_held_out_data(trained_intent):
    out, log = trained_intent
    before, after = log["evals"][0], log["evals"][-1]
    assert before["epoch"] == 0 and after["epoch"] == 2
    assert after["accuracy"] >= before["accuracy"] + 0.4, log["evals"]  # untrained head: about chance (1/6)
    assert after["loss"] < before["loss"]
    assert log["best"]["metric"] == "accuracy" and log["best"]["epoch"] >= 1
    losses = [h["loss"] for h in log["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert log["trainable_parameters"] < 0.02 * log["total_parameters"]


def test_run_writes_an_hf_peft_dir_with_labels_log_and_curve(trained_intent):
    out, log = trained_intent
    for name in ("adapter_config.json", "adapter_model.safetensors", "labels.json", "training_log.json",
                 "training_curve.png", "checkpoint/trainer_state.pt"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "labels.json")) as f:
        assert json.load(f)["labels"] == sorted({r["label"] for r in _rows("intent_train.jsonl")})
    with open(os.path.join(out, "training_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "training_log.json")) as f:
        saved = json.load(f)
    assert saved["evals"] == log["evals"]
    n = saved["steps_per_epoch"]  # an entry every 5 steps (logging_steps) and at each epoch's end
    assert [h["step"] for h in saved["history"]] == sorted({*range(5, 2 * n + 1, 5), n, 2 * n})
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["base_model_name_or_path"] == _minilm()


def test_trained_adapter_loads_in_hf_peft_with_identical_outputs(trained_intent):
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import edgepeft
    from edgepeft.models import load_base

    out, log = trained_intent
    labels = log["labels"]
    tok = AutoTokenizer.from_pretrained(_minilm())
    batch = tok(["set an alarm for 7", "is it going to snow in Oslo tomorrow?"], return_tensors="pt", padding=True)
    ours = edgepeft.PeftModel.from_pretrained(load_base(_minilm(), "seq-cls", labels=labels), out).eval()
    ref_base = AutoModelForSequenceClassification.from_pretrained(_minilm(), num_labels=len(labels))
    ref = peft.PeftModel.from_pretrained(ref_base, out).eval()
    with torch.no_grad():
        a = ours(**batch).logits
        b = ref(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_trained_adapter_exports_and_the_runtime_names_its_predictions(trained_intent, workdir):
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    out, log = trained_intent
    exp = str(workdir / "export-trained-intent")
    report = export([out], exp, names=["intent"])
    assert max(c["max_abs_diff"] for c in report["checks"]) < 1e-4
    rt = Runtime(exp)
    assert rt.labels("intent") == log["labels"]
    rows = _rows("intent_eval.jsonl")
    ids, mask = rt.tokenizer.encode([r["text"] for r in rows], pad_id=0)  # one right-padded batch
    assert (mask[:, 0] == 1).all()
    logits = rt.forward(ids, mask, adapter="intent")["logits"]
    one = rt.forward(*rt.tokenizer.encode([rows[-1]["text"]], pad_id=0), adapter="intent")["logits"]
    assert np.abs(one[0] - logits[-1]).max() < 1e-4  # padding does not change a row's prediction
    accuracy = np.mean([rt.labels("intent")[i] == r["label"] for i, r in zip(logits.argmax(-1), rows)])
    assert accuracy == pytest.approx(log["best"]["value"], abs=1e-9)  # OUT holds the best epoch's adapter


def test_causal_lm_trains_on_completions_only_and_reports_perplexity(text_model, tmp_path):
    rows = [{"prompt": f"Review: {r['text']}\nSentiment:", "completion": f" {r['label']}"}
            for r in _rows("sentiment_train.jsonl", 96)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    log = train(model=text_model("llama"), task="causal-lm", data=data, eval_data=data, out=str(tmp_path / "out"),
                epochs=4, lr=2e-2, batch_size=8, options={"r": 8, "target_modules": "all-linear"}, progress=False)
    first, last = log["evals"][0], log["evals"][-1]
    assert last["loss"] < 0.5 * first["loss"], log["evals"]  # two words to predict: far easier than the whole text
    assert last["perplexity"] == pytest.approx(np.exp(last["loss"]))
    assert log["best"]["metric"] == "loss"
    assert log["best"]["value"] == min(e["loss"] for e in log["evals"][1:])  # the saved log holds the loss itself


@pytest.mark.parametrize("method,options", [("ia3", {}), ("bottleneck", {"bottleneck_size": 8}),
                                            ("prefix", {"num_virtual_tokens": 4}), ("prompt", {"num_virtual_tokens": 4})])
def test_every_method_trains_from_the_same_loop(text_model, tmp_path, method, options):
    rows = [{"text": r["text"]} for r in _rows("sentiment_train.jsonl", 64)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    log = train(model=text_model("llama"), task="causal-lm", method=method, data=data, eval_data=data,
                out=str(tmp_path / method), epochs=2, lr=1e-2, batch_size=16, options=options, progress=False)
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    with open(tmp_path / method / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == {"ia3": "IA3", "bottleneck": "BOTTLENECK", "prefix": "PREFIX_TUNING",
                                             "prompt": "PROMPT_TUNING"}[method]


@pytest.mark.parametrize("method, options", [("lora", None), ("prompt", {"num_virtual_tokens": 4})])
def test_feature_extraction_pairs_train_with_in_batch_negatives(method, options, text_model, tmp_path):
    """Prompt tuning puts its virtual tokens first in last_hidden_state: pooling reads the text's own positions."""
    train_rows = _rows("intent_train.jsonl")
    by_label = {}
    for r in train_rows:
        by_label.setdefault(r["label"], []).append(r["text"])
    pairs = [{"text": texts[i], "positive": texts[i + 12]}  # another text of the same intent, never an anchor
             for texts in by_label.values() for i in range(12)]
    data = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    extra = {"options": options} if options else {}
    log = train(model=text_model("bert"), task="feature-extraction", data=data, eval_data=data, method=method,
                out=str(tmp_path / "out"), epochs=3, lr=5e-3, batch_size=12, progress=False, **extra)
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    assert 0.0 <= log["evals"][-1]["accuracy"] <= 1.0


def _args(model, data, out, **kw):
    kw.setdefault("options", {"r": 2, "target_modules": ["query", "value"]})
    return TrainingArguments(model=model, task="seq-cls", data=data, eval_data=data, out=out, epochs=2, lr=5e-3,
                             batch_size=8, progress=False, **kw)


@pytest.mark.parametrize("method, options", [
    ("lora", None),
    ("prefix", {"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 16}),  # saved projected
], ids=["lora", "prefix-projection"])
def test_resume_continues_exactly_where_the_run_stopped(method, options, text_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 32))
    model = text_model("bert")
    extra = {"method": method, "options": options} if options else {}
    straight = Trainer(_args(model, data, str(tmp_path / "a"), save="last", **extra)).train()

    calls = {"n": 0}
    real_end = Trainer._end_epoch

    def stop_after_first_epoch(self, *args):
        real_end(self, *args)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the run dies after its first checkpoint

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_first_epoch)  # private: a Ctrl-C right after a checkpoint
    with pytest.raises(TrainingInterrupted) as interrupted:  # Ctrl-C: the checkpoint and the command that resumes it
        Trainer(_args(model, data, str(tmp_path / "b"), save="last", **extra)).train()
    message = str(interrupted.value)
    assert os.path.join(str(tmp_path / "b"), "checkpoint") in message and "after epoch 1 of 2" in message
    monkeypatch.setattr(Trainer, "_end_epoch", real_end)
    real_read = training_module.read_checkpoint  # made by two processes (torchrun): this one-process run is refused
    monkeypatch.setattr(training_module, "read_checkpoint", lambda out: {**(state := real_read(out)),
                                                                         "log": {**state["log"], "world_size": 2}})
    with pytest.raises(ConfigError, match="was made by 2 training process\\(es\\), this run has 1; resume with 2"):
        Trainer(_args(model, data, str(tmp_path / "b"), save="last", resume=True, **extra)).train()
    monkeypatch.setattr(training_module, "read_checkpoint", real_read)
    # rows added to the data since: the resumed epochs ran twice the steps, the log kept the old counts
    _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 40))
    with pytest.raises(ConfigError, match=f"was made with other rows in {data} \\(the file changed since"):
        Trainer(_args(model, data, str(tmp_path / "b"), save="last", resume=True, **extra)).train()
    _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 32))
    # killed (kill -9) between the checkpoint's two renames, and while staging one: --resume said "no checkpoint",
    # without it "pass --overwrite" (every epoch lost); the resumed run puts it back and removes the staging folder
    made = subprocess.run([sys.executable, "-c", "import sys, edgepeft.files as f; print(f.staging_dir(sys.argv[1], "
                           "'checkpoint'))", str(tmp_path / "b")], capture_output=True, text=True, check=True)
    owner = os.path.basename(made.stdout.strip()).split("-")[2]  # .staging-checkpoint-<owner>-<random>, its process gone
    assert os.path.isdir(made.stdout.strip()) and owner.startswith("p")
    os.rename(tmp_path / "b" / "checkpoint", tmp_path / "b" / f".old-checkpoint-{owner}-x")
    command = shlex.split(message.split("continue with: ", 1)[1])  # the printed command, run as given
    assert command[:2] == ["edgepeft", "train"] and command[-1] == "--resume"
    result = CliRunner().invoke(cli, command[1:] + ["--quiet"])
    assert result.exit_code == 0, result.output
    assert not [n for n in os.listdir(tmp_path / "b") if n.startswith(".")]
    with open(tmp_path / "b" / "training_log.json") as f:
        resumed = json.load(f)

    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in straight["history"]]
    assert [e["epoch"] for e in resumed["evals"]] == [0, 1, 2]


def test_ctrl_c_while_an_epoch_is_saved_waits_for_its_checkpoint(text_model, tmp_path, monkeypatch, sigint_raises):
    """Ctrl-C while the curve was drawn (after the adapter, before the checkpoint): 'nothing was saved', yet OUT
    held an adapter and no checkpoint, so neither --resume nor a new run into OUT could go on."""
    import signal

    real = training_module.training_curve

    def curve_then_ctrl_c(log, path):
        real(log, path)
        signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(training_module, "training_curve", curve_then_ctrl_c)
    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 16))
    with pytest.raises(TrainingInterrupted, match="holds the run after epoch 1 of 2; continue with: .*--resume"):
        Trainer(_args(text_model("bert"), data, str(tmp_path / "o"))).train()
    assert os.path.isfile(tmp_path / "o" / "checkpoint" / "trainer_state.pt")


def test_warmup_takes_as_many_steps_as_in_transformers(text_model, tmp_path):
    """transformers rounds warmup_ratio x steps up (ceil): 0.1 of 12 steps is 2 warm-up steps; round() gave 1. The
    log gives the rate each step took, as transformers logs it (it gave the next step's: the first at the full rate,
    the last at 0); a step fp16's gradient scaler skips does not move the schedule (it took a warm-up step)."""
    from accelerate import Accelerator

    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 12))
    args = _args(text_model("bert"), data, str(tmp_path / "o"), logging_steps=1)
    args.epochs, args.batch_size = 1, 1
    log = Trainer(args).train()
    assert [h["lr"] for h in log["history"][:3]] == pytest.approx([0.0, args.lr / 2, args.lr])
    assert log["history"][-1]["lr"] == pytest.approx(args.lr / 10)  # 1 of the 10 decay steps left
    skipped = iter([True] + [False] * 20)  # the first step overflowed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: next(skipped)))
        args.out = str(tmp_path / "p")
        log = Trainer(args).train()
    assert [h["lr"] for h in log["history"][:3]] == pytest.approx([0.0, 0.0, args.lr / 2])


def test_gradient_accumulation_makes_fewer_optimizer_steps(text_model, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 32))
    log = Trainer(_args(text_model("bert"), data, str(tmp_path / "o"), grad_accum=2)).train()
    assert log["steps_per_epoch"] == 2  # 32 rows / batch 8 = 4 micro-batches, 2 per step
    assert [h["step"] for h in log["history"]] == [2, 4]  # logging_steps 10: an entry at each epoch's end


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_gradient_accumulation_takes_the_step_the_whole_batch_takes(text_model, tmp_path, method):
    """As transformers' Trainer (num_items_in_batch): 2 x 2 and 1 x 4 batches give the 4-row batch's step. Each
    micro-batch's token mean was divided by grad_accum, so a short row's tokens counted for more (cosine 0.70).
    Prompt tuning: the text's first token, predicted from the last virtual token, was not counted (0.02 apart)."""
    from safetensors.torch import load_file

    words = [" ".join(f"w{i}" for i in range(n)) for n in (2, 30, 3, 25)]  # lengths far apart
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in words])
    adapters = []
    for batch, accum, lr in ((4, 1, 1e-2), (2, 2, 1e-2), (1, 4, 1e-2), (4, 1, 3e-2)):
        out = tmp_path / f"b{batch}-{lr}"
        train(model=text_model("llama"), task="causal-lm", method=method, data=data, out=str(out), epochs=1, lr=lr,
              batch_size=batch, grad_accum=accum, options={"lora_dropout": 0.0} if method == "lora" else {},
              warmup_ratio=0.0, progress=False)  # the one step's rate not 0 (warm-up), which changed nothing
        adapters.append(load_file(out / "adapter_model.safetensors"))
    moved = adapters.pop()  # a step was taken: another rate, another adapter
    assert any(not torch.equal(moved[key], value) for key, value in adapters[0].items())
    for other in adapters[1:]:
        for key, value in adapters[0].items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-6)


def test_training_reads_the_base_config_once(text_model, tmp_path, monkeypatch):
    """One look-up serves the length checks and the model load (a hub id: one request fewer)."""
    import edgepeft.models as models

    calls, real = [], models.load_model_config
    for module in (models, training_module):  # the trainer's own name for it, and the loaders'
        monkeypatch.setattr(module, "load_model_config", lambda *a, **k: calls.append(a) or real(*a, **k))
    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 8))
    args = _args(text_model("bert"), data, str(tmp_path / "o"))
    args.epochs = 1
    Trainer(args).train()
    assert len(calls) == 1


def test_cli_train_then_export_then_run(text_model, tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import cli

    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 32))
    out = str(tmp_path / "sentiment")
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--model", text_model("bert"), "--task", "seq-cls", "--data", data,
                                 "--eval", data, "--out", out, "--epochs", "1", "--r", "2", "--target-modules",
                                 "query,value", "--option", "lora_dropout=0.1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "best eval accuracy" in result.output
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 2 and config["lora_dropout"] == 0.1 and sorted(config["target_modules"]) == ["query", "value"]
    result = runner.invoke(cli, ["export", "--adapter", out, "--out", str(tmp_path / "exp")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["run", str(tmp_path / "exp"), "--adapter", "sentiment", "what a lovely day"])
    assert result.exit_code == 0, result.output
    assert {line.split("\t")[0] for line in result.output.strip().splitlines()} == {"negative", "positive"}
    result = runner.invoke(cli, ["inspect", str(tmp_path / "exp")])
    assert "labels: negative, positive" in result.output


@pytest.mark.parametrize("task", ["seq-cls", "feature-extraction"])
def test_two_cpu_processes_train_one_model_with_ddp(text_model, tmp_path, task):
    """torchrun with 2 processes: gloo DDP, each process half of every epoch, replicas identical."""
    rows = _rows("sentiment_train.jsonl", 64)
    if task == "feature-extraction":  # pairs: one forward per step holds both sides (DDP needs that)
        rows = [{"text": a["text"], "positive": b["text"]} for a, b in zip(rows[:32], rows[32:])]
    data = _write_jsonl(tmp_path / "d.jsonl", rows[:32])
    held = _write_jsonl(tmp_path / "e.jsonl", rows[:13])  # 4 batches of 4, the last of 1: not even over 2 processes
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m",
           "edgepeft", "train", "--model", text_model("bert"), "--task", task, "--data", data, "--eval", held,
           "--out", out, "--epochs", "2", "--batch-size", "4", "--rank", "2", "--lr", "1e-3", "--quiet",
           *(["--target-modules", "all-linear"] if task == "feature-extraction" else [])]  # the pooler: DDP's unused
    proc = finished(cmd, env, timeout=240, marker=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [line for line in proc.stdout.splitlines() if line.startswith(("ok: best eval", "done, but"))]
    assert len(reports) == 1  # one report, from rank 0
    with open(os.path.join(out, "training_log.json")) as f:
        log = json.load(f)
    assert log["world_size"] == 2 and log["args"]["task"] == task
    assert log["steps_per_epoch"] == 4  # 32 rows / (batch 4 x 2 processes)
    a, b = log["replica_checksums"]
    assert a == b  # both processes hold the same adapter after training
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    alone = train(model=text_model("bert"), task=task, data=data, eval_data=held, out=str(tmp_path / "one"), epochs=1,
                  batch_size=4, lr=1e-3, progress=False, options={"r": 2})
    # the untrained adapter scores as in one process (accelerate's even shares repeated 3 rows, which the loss counted)
    assert log["evals"][0] == pytest.approx(alone["evals"][0], rel=1e-5)  # float32 sums, other thread counts
    if task == "seq-cls":  # Ctrl-C after epoch 1, then --resume: the same run (rank 1 resumed with rank 0's dropout)
        stop = tmp_path / "stop.py"
        stop.write_text("import sys\nfrom edgepeft.training.trainer import Trainer\nend = Trainer._end_epoch\n\n"
                        "def stop(self, *args):\n    end(self, *args)\n    raise KeyboardInterrupt\n\n\n"
                        "Trainer._end_epoch = stop\nfrom edgepeft.cli import main\nmain(sys.argv[1:])\n")
        cut = str(tmp_path / "cut")
        head, tail = cmd[:cmd.index("-m", 3)], [cut if a == out else a for a in cmd[cmd.index("train"):]]
        stopped = finished([*head, str(stop), *tail], env, timeout=240, marker=cut)
        printed = [line for line in stopped.stderr.splitlines() if line.startswith("interrupted; ")]  # not in its report
        assert stopped.returncode != 0 and len(printed) == 1 and "with: torchrun --nproc-per-node 2" in printed[0]
        resumed = finished([*head, "-m", "edgepeft", *tail, "--resume"], env, timeout=240, marker=cut)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        with open(os.path.join(cut, "training_log.json")) as f:
            again = json.load(f)
        assert again["replica_checksums"] == log["replica_checksums"] and again["evals"] == log["evals"]


@pytest.mark.parametrize("rows", [26, 3])  # 3: the second process has no batch all epoch (a spare each step)
def test_two_processes_train_each_row_once_as_one_process_with_their_batch(text_model, tmp_path, rows):
    """26 rows in batches of 4 over 2 processes: accelerate's even batches filled the last ones with the epoch's
    first rows, trained twice (0.02 off one process at batch 8, against 3e-7 where the rows divide evenly)."""
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", rows))
    common = ["--model", text_model("llama"), "--task", "seq-cls", "--data", data, "--epochs", "2", "--lr", "1e-2",
              "--rank", "2", "--option", "lora_dropout=0", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "edgepeft",
           "train", *common, "--out", str(tmp_path / "two"), "--batch-size", "4"]
    proc = finished(two, env, timeout=240, marker=str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "edgepeft", "train", *common, "--out", str(tmp_path / "one"),
                          "--batch-size", "8"], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (load_file(str(tmp_path / side / "adapter_model.safetensors")) for side in ("two", "one"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    logs = [json.load(open(tmp_path / side / "training_log.json")) for side in ("two", "one")]
    assert [h["loss"] for h in logs[0]["history"]] == pytest.approx([h["loss"] for h in logs[1]["history"]], rel=1e-5)


def test_a_script_under_torchrun_trains_twice(text_model, tmp_path):
    """``edgepeft.train`` twice in one torchrun script (a sweep): the second run trains in the process group the
    first left (it had ended it: the second failed at its first collective, a ValueError from torch)."""
    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 16))
    script = tmp_path / "sweep.py"
    script.write_text(
        "import json, os, edgepeft\n"
        f"logs = [edgepeft.train(model={text_model('bert')!r}, task='seq-cls', data={data!r}, epochs=1,\n"
        f"                       out=os.path.join({str(tmp_path)!r}, f'lr{{lr}}'), batch_size=4, lr=lr,\n"
        "                       progress=False, options={'r': 2}) for lr in (1e-3, 3e-3)]\n"
        "if os.environ['RANK'] == '0':\n"
        "    print(json.dumps([log['replica_checksums'] for log in logs]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script)]
    proc = finished(cmd, env, timeout=240, marker=str(script))
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.splitlines()[-1])
    assert first[0] == first[1] and second[0] == second[1] and first != second  # each run's replicas agree


def test_bf16_autocast_trains_and_saves_fp32_weights(text_model, tmp_path):
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "d.jsonl", _rows("sentiment_train.jsonl", 32))
    log = Trainer(_args(text_model("bert"), data, str(tmp_path / "bf16"), mixed_precision="bf16")).train()
    assert all(np.isfinite(e["loss"]) for e in log["evals"])
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    weights = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}


@pytest.mark.parametrize("kind, accuracy_drop, size", [("int8", 0.03, 0.4), ("int4", 0.05, 0.25)])
@pytest.mark.slow
def test_quantized_export_of_a_trained_classifier_keeps_its_accuracy(kind, accuracy_drop, size, trained_intent, workdir):
    """Real MiniLM weights, a trained adapter: int8 / int4 base weights change few held-out predictions.

    Measured: float32 0.883, int8 0.875, int4 0.867 (relative error 0.044 and 0.061) in one run.
    """
    from edgepeft.exporters import export
    from edgepeft.runtimes import Runtime

    out, log = trained_intent
    exp = str(workdir / f"export-trained-intent-{kind}")
    report = export([out], exp, names=["intent"], quantize=kind)
    assert max(c["relative_error"] for c in report["checks"] if "relative_error" in c) < 0.2
    rt = Runtime(exp)
    rows = _rows("intent_eval.jsonl")
    ids, mask = rt.tokenizer.encode([r["text"] for r in rows], pad_id=0)
    predicted = [rt.labels("intent")[i] for i in rt.forward(ids, mask, adapter="intent")["logits"].argmax(-1)]
    accuracy = np.mean([p == r["label"] for p, r in zip(predicted, rows)])
    assert accuracy >= log["best"]["value"] - accuracy_drop, (accuracy, log["best"]["value"])
    # quantized projections and word embeddings (half of MiniLM): int8 <= 0.4, int4 <= 0.25 of float32
    assert os.path.getsize(os.path.join(exp, "base", "model.onnx")) < size * 4 * log["total_parameters"]


def test_decoder_classifier_trains_exports_and_predicts_right_padded_batches(text_model, tmp_path):
    """Llama seq-cls reads the last real token: right-padded batches in the runtime give each row's own logits."""
    import edgepeft
    from edgepeft.exporters import export
    from edgepeft.models import load_base
    from edgepeft.runtimes import Runtime

    rows = _rows("sentiment_train.jsonl", 48)
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = str(tmp_path / "llama-cls")
    log = train(model=text_model("llama"), task="seq-cls", data=data, eval_data=data, out=out, epochs=2, lr=5e-3,
                batch_size=8, options={"r": 4, "target_modules": "all-linear"}, progress=False)
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    exp = str(tmp_path / "exp")
    export([out], exp)
    rt = Runtime(exp)
    texts = [r["text"] for r in rows[:6]]
    ids, mask = rt.tokenizer.encode(texts, pad_id=0)
    assert (mask[:, 0] == 1).all() and (mask == 0).any()  # right padding, rows of different lengths
    batched = rt.forward(ids, mask, adapter="llama-cls")["logits"]
    model = edgepeft.PeftModel.from_pretrained(load_base(text_model("llama"), "seq-cls", labels=log["labels"]), out).eval()
    for i, text in enumerate(texts):
        one = rt.forward(*rt.tokenizer.encode([text], pad_id=0), adapter="llama-cls")["logits"][0]
        assert np.abs(one - batched[i]).max() < 1e-4
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(rt.tokenizer.encode([text], pad_id=0)[0])).logits[0].numpy()
        assert np.abs(ref - one).max() < 1e-4


def test_decoder_classifier_batches_pad_with_the_models_pad_token(text_model, tmp_path):
    """A tokenizer without a pad token (its eos pads) under a config.json whose pad_token_id the decoder classifier
    looks for: training batches pad with the model's id, so a short row is read at its last token, not a pad."""
    import shutil

    from edgepeft.models import load_base
    from edgepeft.peft_model import get_peft_model
    from edgepeft.tuners.lora.config import LoraConfig

    model = str(tmp_path / "llama-no-tokenizer-pad")
    shutil.copytree(text_model("llama"), model)
    with open(os.path.join(model, "tokenizer_config.json")) as f:
        config = json.load(f)
    config.pop("pad_token", None)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    data = tmp_path / "cls.jsonl"
    data.write_text('{"text": "play jazz", "label": "a"}\n'
                    '{"text": "what is the weather like today in paris please", "label": "b"}\n')
    args = _args(model, str(data), str(tmp_path / "o"))
    encoder, rows, _, labels, _ = Trainer(args)._data(method_config(args.method, args.task, dict(args.options)))
    assert encoder.pad_id == 0 != encoder.tokenizer.eos_token_id  # config.json's, not the tokenizer's eos
    torch.manual_seed(0)
    m = get_peft_model(load_base(model, "seq-cls", labels=labels), LoraConfig(task_type="SEQ_CLS")).eval()
    batch, alone = encoder.collate(rows), encoder.collate(rows[:1])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is padded in the batch
    with torch.no_grad():
        in_batch = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0]
        single = m(input_ids=alone["input_ids"], attention_mask=alone["attention_mask"]).logits[0]
    assert float((in_batch - single).abs().max()) <= 1e-5


def test_out_may_not_be_the_model_or_inside_an_export(text_model, shared_export, tmp_path):
    """Training into the --model folder made the base an adapter folder; into OUT/base or OUT/adapters/x, the next
    export replaced the adapter. Both are refused before any work, and nothing is written."""
    data = tmp_path / "cls.jsonl"
    data.write_text('{"text": "play jazz", "label": "a"}\n{"text": "weather", "label": "b"}\n')
    model = text_model("bert")
    out = shared_export("llama")[0]
    for target, needle in ((model, "is the --model folder"), (os.path.join(out, "base"), "lies inside the export"),
                           (os.path.join(out, "adapters", "new"), "lies inside the export"),
                           (out, "is an export"), (os.path.join(out, "base", "x", "y"), "lies inside")):
        existed = os.path.exists(target)
        before = sorted(os.listdir(target)) if existed else None
        with pytest.raises(ConfigError, match=needle):
            Trainer(_args(model, str(data), target)).train()
        assert (sorted(os.listdir(target)) if os.path.exists(target) else None) == before  # nothing written



def test_a_classifier_checkpoints_own_label_order_is_kept(text_model, tmp_path):
    """A trained classifier (config.json id2label {0: POS, 1: NEG}) trained on data labelled pos/neg with sorted labels
    started with its head inverted and saved names HF PEFT read the other way round."""
    model = shutil.copytree(text_model("bert"), tmp_path / "clf")
    edit_json(model / "config.json", id2label={"0": "POS", "1": "NEG"}, label2id={"POS": 0, "NEG": 1})
    rows = _rows("sentiment_train.jsonl", 24)  # labels negative / positive
    rows = [dict(r, label=("pos" if r["label"] == "positive" else "neg")) for r in rows]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = str(tmp_path / "out")
    Trainer(_args(str(model), data, out)).train()
    with open(os.path.join(out, "labels.json")) as f:
        assert json.load(f)["labels"] == ["pos", "neg"]
