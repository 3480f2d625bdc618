"""What training does beyond reading its rows, found by bug hunts (each test failed before its fix): the model it
refuses, the eval it scores, the optimizer it builds (as transformers' Trainer), the checkpoints it resumes and the
notes it prints."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from file_checks import edit_json, edited_json, write_lines
from training_helpers import cli_error, seq_cls_rows, train_argv
from edgepeft.errors import ConfigError
from edgepeft.training import train
from edgepeft.training.data import Encoder


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_a_classifier_that_is_not_single_label_is_refused_naming_the_fix(text_model, tmp_path, capsys, problem_type):
    """Its BCE or MSE loss on class ids was a size-mismatch traceback from transformers."""
    model = shutil.copytree(text_model("bert"), tmp_path / "model")
    edit_json(os.path.join(model, "config.json"), problem_type=problem_type)
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    line = cli_error(capsys, *train_argv(str(model), data, str(tmp_path / "out")))
    assert line.endswith(f"config.json's problem_type is {problem_type!r}; edgepeft trains single-label "
                         "classification (one label per row), and a reranker's score (one output); use a copy of the "
                         "model without problem_type in its config.json")
    assert not os.path.exists(tmp_path / "out")
    with edited_json(os.path.join(model, "config.json")) as config:  # the fix: without it
        del config["problem_type"]
    train(model=str(model), task="seq-cls", method="lora", data=data, out=str(tmp_path / "out"), epochs=1, progress=False)


def test_a_duplicate_pair_in_a_retrieval_eval_is_no_miss(text_model, tmp_path, monkeypatch):
    """Its copy's positive ties with its own, and argmax took the first: 0.25 where the pairs alone gave 0.5. Found
    by a hunt: every text was scored against every positive at once, N² memory (4.3 GiB at 32,000 eval pairs);
    now in blocks of 1,024 texts."""
    import torch

    pairs = [{"text": "i love it", "positive": "love it"}, {"text": "awful day", "positive": "bad day"},
             {"text": "great stuff", "positive": "so good"}]
    data = write_lines(tmp_path / "d.jsonl", pairs)
    accuracy, scored = {}, []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: scored.append(a.shape[0]) or matmul(a, b))
    for name, rows in (("once", pairs), ("twice", pairs + pairs), ("many", pairs * 400)):
        evals = write_lines(tmp_path / f"{name}.jsonl", rows)
        log = train(model=text_model("bert"), task="feature-extraction", method="lora", data=data, eval_data=evals,
                    out=str(tmp_path / name), epochs=1, batch_size=8, progress=False)
        accuracy[name] = log["evals"][0]["accuracy"]  # the untrained adapter's
    assert accuracy["many"] == accuracy["twice"] == accuracy["once"] > 0
    assert max(scored) == 1024


def test_a_checkpoint_of_an_earlier_edgepeft_resumes_a_prompt_adapter(tiny_base):
    """Its encoders sat inside the input embeddings (...embed_tokens.prompt_encoder...): their names changed, and the
    checkpoint was refused as not matching the model (every epoch lost)."""
    import torch

    import edgepeft
    from edgepeft.training.checkpoint import load_trainable
    from tiny import load_reference_base

    peft = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                   edgepeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    (name, param), = [(n, p) for n, p in peft.named_parameters() if p.requires_grad]
    assert name == "base_model.model.virtual_tokens.prompt_encoder.default.embedding.weight"
    saved = torch.randn_like(param)
    load_trainable(peft, {"base_model.model.model.embed_tokens.prompt_encoder.default.embedding.weight": saved})
    assert torch.equal(param, saved)


def test_weight_decay_leaves_biases_and_norms_as_transformers_trainer_does(tiny_base):
    """--weight-decay decayed every trainable tensor: a classifier's bias, a bottleneck's biases (transformers keeps
    biases and norm weights out of decay: 0.0022 on a head's bias after 26 steps at 0.5)."""
    import transformers

    import edgepeft
    from edgepeft.training.optimizer import make_optimizer
    from tiny import load_reference_base

    peft = edgepeft.get_peft_model(load_reference_base(tiny_base("bert"), "seq-cls", num_labels=2),
                                   edgepeft.BottleneckConfig(task_type="SEQ_CLS", bottleneck_size=4))
    optimizer = make_optimizer(peft, 1e-3, 1e-2, 0.5)
    names = {id(p): n for n, p in peft.named_parameters()}
    undecayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
    assert undecayed == trainable - set(transformers.Trainer.get_decay_parameter_names(None, peft))
    assert any("classifier" in n for n in undecayed) and any("adapter" in n for n in undecayed)
    assert {names[id(p)] for g in optimizer.param_groups if g["lr"] == 1e-2 for p in g["params"]} == \
        {n for n in trainable if ".modules_to_save." in n}  # the head at its own rate
    assert [len(g["params"]) > 0 for g in make_optimizer(peft, 1e-3, 1e-2, 0.0).param_groups] == [True, True]


def test_modules_a_user_trains_whole_train_at_lr_and_only_heads_made_at_load_at_head_lr(text_model, tmp_path):
    """modules_to_save=["lm_head"] trained the pretrained output layer at --head-lr (1e-2), 1,000x a --lr of 1e-5:
    --head-lr is for a head that starts from random weights (a classifier the base lacks)."""
    from edgepeft.models import load_base
    from edgepeft.peft_model import get_peft_model
    from edgepeft.training.optimizer import make_optimizer
    from edgepeft.tuners.lora.config import LoraConfig

    def rates(peft) -> dict:
        names = {id(p): n for n, p in peft.named_parameters()}
        return {names[id(p)].split(".")[2]: g["lr"] for g in make_optimizer(peft, 1e-5, 1e-2, 0.0).param_groups
                for p in g["params"] if ".modules_to_save." in names[id(p)]}

    model = text_model("llama")
    lm = get_peft_model(load_base(model, "causal-lm"), LoraConfig(task_type="CAUSAL_LM", modules_to_save=["lm_head"]))
    assert rates(lm) == {"lm_head": 1e-5}
    load_base(model, "seq-cls", labels=["a", "b"]).save_pretrained(tmp_path / "classifier")
    classifier = load_base(model, "seq-cls", labels=["a", "b"])
    assert rates(get_peft_model(classifier, LoraConfig(task_type="SEQ_CLS"))) == {"score": 1e-2}  # made at load
    again = load_base(str(tmp_path / "classifier"), "seq-cls", labels=["a", "b"])
    assert rates(get_peft_model(again, LoraConfig(task_type="SEQ_CLS"))) == {"score": 1e-5}  # a classifier's own


def test_fields_of_another_task_in_the_eval_file_get_their_note(text_model, tmp_path, capsys):
    """Only --data's were noted: an eval file of seq-cls rows scored a causal-lm run on their text, silently."""
    data = write_lines(tmp_path / "d.jsonl", [{"text": f"sample number {i}"} for i in range(4)])
    evals = write_lines(tmp_path / "e.jsonl", seq_cls_rows(4))
    train(model=text_model("llama"), task="causal-lm", method="lora", data=data, eval_data=evals,
          out=str(tmp_path / "out"), epochs=1, progress=False)
    assert f'note: {evals}: rows carry "label", which causal-lm training ignores' in capsys.readouterr().err


def test_embedding_pairs_without_in_batch_negatives_are_refused(text_model, tmp_path, capsys):
    """A pair alone in its batch scores its text against its own positive only: the loss was 0 at every step, and
    the run ended with an untrained adapter, silently."""
    model = text_model("bert")
    one = write_lines(tmp_path / "one.jsonl", [{"text": "i love it", "positive": "love it"}])
    two = write_lines(tmp_path / "two.jsonl", [{"text": "i love it", "positive": "love it"},
                                               {"text": "awful day", "positive": "bad day"}])
    argv = ["train", "--model", model, "--task", "feature-extraction", "--out", tmp_path / "out", "--epochs", "1",
            "--quiet", "--data"]
    assert cli_error(capsys, *argv, one).endswith(
        "one.jsonl: one pair; in-batch negatives score each text against the other pairs' positives, so add pairs "
        "(2 or more)")
    assert cli_error(capsys, *argv, two, "--batch-size", "1") == (
        "error: --batch-size 1 leaves each pair without negatives (its loss is 0, nothing is learnt); pass "
        "--batch-size 2 or more, or give hard negatives (\"negative\")")
    assert not os.path.exists(tmp_path / "out")
    # an adapter on BERT's pooler only, which embeddings never read: torch's "does not require grad" traceback
    assert "--target-modules ['pooler.dense'] are all off the path to the embeddings" in cli_error(
        capsys, *argv, two, "--target-modules", "pooler.dense")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("arch, pad", [("llama", None), ("gpt2", None), ("llama", -1), ("gpt2", "vocab")])
def test_a_decoder_classifier_with_a_prompt_trains_on_each_rows_last_real_token(text_model, tmp_path, arch, pad):
    """A decoder classifier given inputs_embeds (a prompt before the tokens) pools the last position, which in a
    right-padded batch is a pad: training and its eval read padding (logged loss 2.81 against 2.71 row by row), while
    classify serves each row as the row alone gives it. A batch's loss and logits are now those of its rows alone.
    So for a config pad that is no token (Llama -1, GPT-2 vocab_size; found by a review): an IndexError traceback."""
    from edgepeft.models import load_base
    from edgepeft.peft_model import get_peft_model
    from edgepeft.training import Trainer, TrainingArguments, method_config

    rows = [{"text": "play some jazz", "label": "a"}, {"text": "what is the weather like in paris today", "label": "b"},
            {"text": "stop", "label": "a"}, {"text": "add milk and eggs to the list", "label": "b"}]
    data, model = write_lines(tmp_path / "d.jsonl", rows), text_model(arch)
    if pad is not None:
        model = shutil.copytree(model, tmp_path / "m")
        edit_json(model / "config.json", pad_token_id=-1 if pad == -1 else json.loads((model / "config.json").read_text(
            ))["vocab_size"])
    method, options = ("prompt", {"num_virtual_tokens": 3}) if pad is None else ("lora", {"r": 2})
    args = TrainingArguments(model=str(model), task="seq-cls", method=method, data=data, out=str(tmp_path / "o"),
                             options=options, progress=False)
    trainer = Trainer(args)
    encoder, features, _, labels, _ = trainer._data(method_config(args.method, args.task, dict(args.options)))
    torch.manual_seed(0)
    model = get_peft_model(load_base(args.model, "seq-cls", labels=labels), method_config(method, "seq-cls", options)).eval()
    batch = encoder.collate(features)
    assert (batch["attention_mask"] == 0).any()  # rows of different lengths, padded on the right
    with torch.no_grad():
        loss, logits = trainer._loss(model, batch)
        alone = torch.cat([model(**encoder.collate([f])).logits for f in features])
    torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(alone, batch["labels"]), rtol=0, atol=1e-5)
    if pad is not None:
        trainer.train()  # an IndexError from the embeddings


def test_stopped_runs_resume_or_start_over_as_their_messages_say(text_model, tmp_path, capsys, monkeypatch):
    """Found by a hunt of interrupted runs: --resume on an OUT with an adapter and no checkpoint said "run without
    --resume", which is refused ("holds an adapter already"); a checkpoint moved with its OUT (mv out renamed) was
    refused for its --out; Ctrl-C after the last epoch was click's bare "aborted"; a feature-extraction eval file of
    one pair scored 0 and 1.0 every epoch; a temp file a killed write left stayed in OUT for good."""
    import contextlib
    import subprocess
    import sys

    from edgepeft.errors import DataError, TrainingInterrupted
    from edgepeft.files import remove_abandoned, remove_empty
    from edgepeft.training import trainer as trainer_module

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "out")
    train(model=text_model("bert"), task="seq-cls", data=data, out=out, epochs=1, progress=False)
    shutil.rmtree(os.path.join(out, "checkpoint"))  # as a run stopped before its first checkpoint leaves OUT
    line = cli_error(capsys, *train_argv(text_model("bert"), data, out, "--resume"))
    assert line.endswith("no checkpoint to resume from; it holds an adapter (a finished run, or one stopped before it "
                         "saved a checkpoint): start over with --overwrite instead of --resume")
    real = trainer_module.replica_checksums  # Ctrl-C after the last epoch's checkpoint: --resume finishes
    monkeypatch.setattr(trainer_module, "replica_checksums", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(TrainingInterrupted, match=r"holds the run after epoch 2 of 2; continue with: edgepeft train"):
        train(model=text_model("bert"), task="seq-cls", data=data, out=out, epochs=2, progress=False, overwrite=True)
    monkeypatch.setattr(trainer_module, "replica_checksums", real)
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    log = train(model=text_model("bert"), task="seq-cls", data=data, out=moved, epochs=2, progress=False, resume=True)
    assert "replica_checksums" in log and log["history"][-1]["epoch"] == 2  # finished, as the checkpoint held it
    assert log["args"]["out"] == os.path.abspath(moved)  # not the checkpoint's old --out
    @contextlib.contextmanager
    def waited(*args):  # Ctrl-C while waiting for another run into OUT: click's bare "aborted"
        os.makedirs(args[0])  # as one_at_a_time makes OUT before it waits
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(trainer_module, "one_at_a_time", waited)
    with pytest.raises(TrainingInterrupted, match=r"interrupted before training began; nothing saved in .*waited$"):
        train(model=text_model("bert"), task="seq-cls", data=data, out=str(tmp_path / "waited"), progress=False)
    assert not os.path.exists(tmp_path / "waited")
    monkeypatch.undo()
    one = write_lines(tmp_path / "one.jsonl", [{"text": "a b", "positive": "a"}])
    with pytest.raises(DataError, match=r"one.jsonl: one pair; retrieval scores each text against the other pairs' positives"):
        train(model=text_model("bert"), task="feature-extraction", data=write_lines(
            tmp_path / "pairs.jsonl", [{"text": f"t {i}", "positive": f"p {i}"} for i in range(4)]), eval_data=one,
            out=str(tmp_path / "fe"), progress=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from edgepeft.files import _owner

    left = os.path.join(moved, f".tmp-p{int(dead.stdout)}{_owner()[_owner().index('h'):]}-abc123")
    open(left, "w").close()
    assert remove_abandoned(moved, "a training run") == [
        f"removed {left} (a file half-written by a training run that was stopped midway)"]
    remove_empty([str(tmp_path / "gone")])  # another process removed it first (torchrun): no FileNotFoundError


def test_two_runs_into_one_out_take_turns(text_model, tmp_path, capsys):
    """Both found OUT fresh, both said ok, and OUT held one's adapter with the other's log and checkpoint. The later
    run now waits for the first, then finds its adapter there (--overwrite to replace it)."""
    import threading

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(16))
    out, results = str(tmp_path / "out"), {}

    def run(lr):
        try:
            results[lr] = train(model=text_model("bert"), task="seq-cls", data=data, out=out, epochs=2, lr=lr,
                                progress=False)
        except Exception as e:  # noqa: BLE001  (what the other thread met is asserted below)
            results[lr] = e

    threads = [threading.Thread(target=run, args=(lr,)) for lr in (1e-3, 5e-2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [lr for lr, r in results.items() if isinstance(r, ConfigError)]
    assert len(refused) == 1 and "holds a checkpoint of an earlier run" in str(results[refused[0]]), results
    finished = next(r for r in results.values() if isinstance(r, dict))
    with open(os.path.join(out, "training_log.json")) as f:
        assert json.load(f)["args"]["lr"] == finished["args"]["lr"]  # OUT is one run's, log and adapter alike


def test_a_process_whose_peer_stopped_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    """torchrun: where only the first process fails (a full disk while saving), the others' next collective fails
    with gloo's "Connection closed by peer", which was a traceback; a process group must be up for that reading."""
    from edgepeft import cli, processes

    def peer_gone(**kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41"
                           "\nException raised from ...")

    def leave(code):
        raise SystemExit(code)

    monkeypatch.setattr(cli.cli, "main", peer_gone)
    monkeypatch.setattr(cli, "leave", leave)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error1.json"))
    with pytest.raises(RuntimeError):  # no process group: not a peer's stop, raised as it is
        cli.main(["train"])
    monkeypatch.setattr(processes, "_group", lambda: torch.distributed)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train"])
    assert stop.value.code == 1 and capsys.readouterr().err == ""  # the first process says why
    with open(tmp_path / "error1.json") as f:
        assert json.load(f)["message"]["message"] == ("error: process 1 stopped with the others ([../third_party/gloo/"
                                                      "gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                                      "[127.0.0.1]:41)")

    def own_error(**kwargs):  # this process's own: raised as it is (torchrun's report shows its traceback)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB on GPU 1")

    monkeypatch.setattr(cli.cli, "main", own_error)
    with pytest.raises(torch.OutOfMemoryError):
        cli.main(["train"])


def test_sizes_no_memory_holds_are_refused_in_a_line(tiny_base, capsys):
    """10**20 rows a batch or tokens a row, a LoRA rank, bottleneck size or prefix projection width of 10**12 or 10**20,
    target modules that are no names: each was a traceback from torch's sampler, the tokenizer, torch's allocator or
    the name matching."""
    import edgepeft
    from edgepeft.training import TrainingArguments
    from tiny import load_reference_base

    for field in ("batch_size", "grad_accum", "max_length", "epochs", "logging_steps"):
        with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} must be a whole number from 1 to 2147483647, "
                                              "got 100000000000000000000"):
            TrainingArguments(model="m", task="seq-cls", data="d", out="o", **{field: 10**20}).check()
    with pytest.raises(ConfigError, match="--lr must be a number"):  # no float holds it: it passed 0 < lr < inf
        TrainingArguments(model="m", task="seq-cls", data="d", out="o", lr=10**400).check()
    model = load_reference_base(tiny_base("llama"), "causal-lm")
    for r in (10**12, 10**20):
        with pytest.raises(ConfigError, match=rf"r {r}: a LoRA of that rank on a 32 x \d+ layer cannot be made \(.*\); "
                                              "use a rank below the layer's widths"):
            edgepeft.get_peft_model(model, edgepeft.LoraConfig(r=r, target_modules=["q_proj"]))
        with pytest.raises(ConfigError, match=rf"bottleneck_size {r}: an adapter of that size on a layer of width 32 cannot "
                                              r"be made \(.*\); use a size below the layer's width"):
            edgepeft.get_peft_model(model, edgepeft.BottleneckConfig(bottleneck_size=r, target_modules=["o_proj"]))
        with pytest.raises(ConfigError, match=rf"encoder_hidden_size {r}: a prefix projection of that width cannot be made "
                                              r"\(.*\); use a width below 128 \(num_layers x 2 x token_dim\)"):
            edgepeft.get_peft_model(model, edgepeft.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                                      encoder_hidden_size=r))
    for width in (0, -3):  # -3: torch's traceback at the layer; 0: a projection of nothing
        with pytest.raises(ConfigError, match=rf"encoder_hidden_size must be a positive integer \(None: token_dim\), got {width}"):
            edgepeft.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=width)
    with pytest.raises(ConfigError, match=r"target_modules must list module names \(strings\), got \[5\]"):
        edgepeft.LoraConfig(target_modules=[5])


def test_an_empty_data_path_or_classes_numbered_with_gaps_are_refused_in_a_line(text_model, tmp_path, capsys):
    """Found by a hunt: --eval "" (a shell's unset $EVAL) trained without an eval and said ok; --data "" said
    ": data file not found"; a --model whose config.json numbers its classes 0, 1, 5 was a KeyError traceback."""
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    out = str(tmp_path / "out")
    line = cli_error(capsys, *train_argv(text_model("bert"), data, out, "--eval", ""))
    assert line == "error: --eval '' names no file; pass a JSONL file (or leave --eval out to train without one)"
    assert cli_error(capsys, *train_argv(text_model("bert"), " ", out)) == "error: --data ' ' names no file; pass a JSONL file"
    model = shutil.copytree(text_model("bert"), tmp_path / "model")
    edit_json(os.path.join(model, "config.json"), id2label={"0": "neg", "1": "pos", "5": "mixed"},
              label2id={"neg": 0, "pos": 1, "mixed": 5})
    line = cli_error(capsys, *train_argv(str(model), data, out))
    assert line == f"error: {model}/config.json: id2label numbers its classes 0, 1, 5, not 0 to 2; renumber them so"
    assert not os.path.exists(out)


def test_embedding_pairs_are_cut_as_embed_cuts_them(text_model, tmp_path):
    """Found by a hunt: training refused a text longer than the model's positions (less a prompt's tokens), which
    Runtime.embed and sentence-transformers cut to the tokenizer's limit (no sentence-transformers files) or to
    max_seq_length less the virtual tokens."""
    from edgepeft.models import load_model_config, load_tokenizer
    from edgepeft.training.pooling import embedding_settings

    model = str(shutil.copytree(text_model("bert"), tmp_path / "model"))
    long = "great product " * 80  # 160+ tokens, past the model's 128 positions
    data = write_lines(tmp_path / "pairs.jsonl", [{"text": long, "positive": "so good"}, {"text": "awful", "positive": "bad"}])
    config, tokenizer = load_model_config(model, "--model"), load_tokenizer(model)
    assert embedding_settings(model, None, config, tokenizer, 0) == (128, "mean", False)
    train(model=model, task="feature-extraction", method="lora", data=data, out=str(tmp_path / "lora"), epochs=1,
          batch_size=2, progress=False)
    with open(os.path.join(model, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 128, "do_lower_case": False}, f)
    assert embedding_settings(model, None, config, tokenizer, 4) == (124, "mean", False)
    train(model=model, task="feature-extraction", method="prompt", data=data, out=str(tmp_path / "prompt"), epochs=1,
          batch_size=2, options={"num_virtual_tokens": 4}, progress=False)


def test_embedding_training_cuts_texts_where_embed_cuts_them(text_model, tmp_path, monkeypatch):
    """Found by a hunt: the default --max-length 256 cut texts that the model's max_seq_length (512 for bge, e5)
    and Runtime.embed keep whole, so training optimized other embeddings than the export serves, silently."""
    import transformers as tf

    import edgepeft.training.trainer as trainer

    model = str(tmp_path / "long")
    config = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=512, vocab_size=tf.AutoTokenizer.from_pretrained(text_model("bert")).vocab_size)
    tf.AutoModel.from_config(config).save_pretrained(model)
    for name in os.listdir(text_model("bert")):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(text_model("bert"), name), model)
    with open(os.path.join(model, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 300, "do_lower_case": False}, f)
    cuts = []
    monkeypatch.setattr(trainer, "Encoder", lambda tokenizer, task, max_length, *a, **k:
                        cuts.append(max_length) or Encoder(tokenizer, task, max_length, *a, **k))
    data = write_lines(tmp_path / "d.jsonl", [{"text": "good " * 400, "positive": "fine"}, {"text": "bad", "positive": "no"}])
    for given, want in ((None, 300), (64, 64), (1000, 300)):
        train(model=model, task="feature-extraction", method="lora", data=data, out=str(tmp_path / f"out{given}"),
              epochs=1, batch_size=2, max_length=given, progress=False)
        assert cuts[-1] == want


def test_hard_negatives_train_alone_and_bad_ones_are_named_and_older_checkpoints_keep_their_cut(text_model, tmp_path):
    """Found by a review: a pair with a hard negative learns alone (in a batch of 1, or a file of one row) but was
    refused as if its loss were 0; a negative holding half a character was a tokenizer traceback and "negative_²"
    a ValueError; a seq-cls or causal-lm checkpoint of an earlier edgepeft (--max-length 256 recorded) no longer
    resumed, its own resume command failing."""
    from edgepeft.errors import DataError
    from edgepeft.training.arguments import TrainingArguments
    from edgepeft.training.data import read_jsonl

    one = write_lines(tmp_path / "one.jsonl", [{"text": "i love it", "positive": "love it", "negative": "hate it"}])
    log = train(model=text_model("bert"), task="feature-extraction", method="lora", data=one, out=str(tmp_path / "o"),
                epochs=1, batch_size=1, progress=False)
    assert log["history"][0]["loss"] > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "positive": "b", "negative": "c \\ud800"}\n')
    with pytest.raises(DataError, match=r'bad.jsonl:1: "negative" holds an unpaired surrogate'):
        read_jsonl(str(bad), "feature-extraction")
    odd = write_lines(tmp_path / "odd.jsonl", [{"text": "a", "positive": "b", "negative_²": "c"}])
    assert read_jsonl(odd, "feature-extraction") == [{"text": "a", "positive": "b", "_line": 1}]
    for task, cut in (("seq-cls", 256), ("causal-lm", 256), ("feature-extraction", None)):
        args = TrainingArguments(model="m", task=task, data="d", out="o")
        args.check()
        assert args.fingerprint()["max_length"] == cut and "--max-length" not in args.command()


def test_evaluating_leaves_the_adapter_trained_as_without(text_model, tmp_path):
    """Each pass over the evaluation rows drew a seed from torch's generator, so --eval changed every later dropout
    mask, and the adapter the same seed and data train."""
    from safetensors.torch import load_file

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(16))
    adapters = []
    for i, eval_data in enumerate((None, data)):
        train(model=text_model("bert"), task="seq-cls", data=data, eval_data=eval_data, out=str(tmp_path / str(i)),
              epochs=2, lr=5e-3, batch_size=8, save="last", progress=False,
              options={"r": 2, "target_modules": ["query", "value"], "lora_dropout": 0.3})
        adapters.append(load_file(str(tmp_path / str(i) / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    for key, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][key], value, rtol=0, atol=0)


def test_training_in_an_app_that_turned_gradients_off_trains_as_elsewhere(text_model, tmp_path):
    """A reproducibility hunt: train() where the app had turned gradients off (torch.no_grad(), inference_mode(),
    set_grad_enabled(False) at a serving app's start) ended in torch's "element 0 of tensors does not require grad"."""
    from safetensors.torch import load_file

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    kwargs = dict(model=text_model("bert"), task="seq-cls", data=data, epochs=1, progress=False)
    train(out=str(tmp_path / "plain"), **kwargs)
    plain = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for name, off in (("no_grad", torch.no_grad), ("inference", torch.inference_mode)):
        with off():
            train(out=str(tmp_path / name), **kwargs)
        weights = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert weights.keys() == plain.keys() and all(torch.equal(weights[k], plain[k]) for k in plain), name
    assert torch.is_grad_enabled()


def test_a_model_and_out_given_through_link_dotdot_are_where_the_system_reads_them(text_model, tmp_path, monkeypatch):
    """A training-paths hunt: --model LINK/.. loaded the link target's parent (transformers reads the path as the
    system does) but adapter_config.json recorded the folder the text goes up to, which export then loaded as the
    base ("ok", another model's weights); --out LINK/.. put temp files and a stray folder in the text's folder (on
    another file system: "Invalid cross-device link" after the first epoch)."""
    model = shutil.copytree(text_model("bert"), tmp_path / "models" / "bert")
    os.makedirs(model / "snapshots")
    os.makedirs(tmp_path / "runs" / "2024" / "latest")
    work = tmp_path / "work"
    os.makedirs(work)
    os.symlink(model / "snapshots", work / "model")
    os.symlink(tmp_path / "runs" / "2024" / "latest", work / "run")
    monkeypatch.chdir(work)
    train(model="model/..", task="seq-cls", data=write_lines(tmp_path / "d.jsonl", seq_cls_rows(8)), out="run/../adapter",
          epochs=1, progress=False)
    with open(tmp_path / "runs" / "2024" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == str(model)
    assert sorted(os.listdir(work)) == ["model", "run"]  # no adapter/ (nor its staging folders) where the text leads


def test_an_out_inside_another_runs_checkpoint_is_refused(text_model, tmp_path):
    """A training-paths hunt: --out A/checkpoint (or a folder in it) trained and said ok; A's next save (--resume)
    replaced its checkpoint folder whole, and that run's adapter with it, unsaid."""
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    train(model=text_model("bert"), task="seq-cls", data=data, out=str(tmp_path / "a"), epochs=1, progress=False)
    before = sorted(os.listdir(tmp_path / "a" / "checkpoint"))
    from edgepeft.exporters import export

    for out in (tmp_path / "a" / "checkpoint", tmp_path / "a" / "checkpoint" / "b"):
        said = f"^{out}: lies in {tmp_path / 'a' / 'checkpoint'}, the checkpoint of the run in .*; give --out a folder of its own$"
        with pytest.raises(ConfigError, match=said):
            train(model=text_model("bert"), task="seq-cls", data=data, out=str(out), epochs=1, progress=False)
        with pytest.raises(ConfigError, match=said):  # a review: an export there went with the run's next save too
            export([str(tmp_path / "a")], str(out))
    assert sorted(os.listdir(tmp_path / "a" / "checkpoint")) == before


def test_one_pipe_given_as_data_and_eval_is_read_once(text_model, tmp_path):
    """A training-paths hunt: --data /dev/stdin --eval /dev/stdin said "/dev/stdin: no rows" (they came, for --data),
    and one FIFO given twice waited for a second writer for ever: a file given as both is read once."""
    import subprocess
    import sys

    rows = "".join(json.dumps(r) + "\n" for r in seq_cls_rows(8))
    argv = train_argv(text_model("bert"), "/dev/stdin", str(tmp_path / "out"), "--eval", "/dev/stdin")
    done = subprocess.run([sys.executable, "-m", "edgepeft", *argv], input=rows, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    with open(tmp_path / "out" / "training_log.json") as f:
        log = json.load(f)
    assert log["train_examples"] == log["eval_examples"] == 8


def test_tokens_added_to_the_tokenizer_alone_are_named_and_an_added_pad_pads_with_eos(text_model, tmp_path, capsys):
    """A hunt: chat tokens added to the tokenizer, not to the model (or an added eos, appended to every row), ended
    training in an IndexError traceback from the embeddings; so did an added pad, which padding only needs to be an
    id of the model's (the eos: padding is masked)."""
    import transformers as tf

    from training_helpers import cli_ok

    base = str(tmp_path / "base")
    shutil.copytree(text_model("llama"), base)
    tok = tf.AutoTokenizer.from_pretrained(base)
    size = tf.AutoConfig.from_pretrained(base).vocab_size
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"], "pad_token": "<|pad|>"})
    tok.save_pretrained(base)
    rows = [{"prompt": f"say {w}", "completion": f" {w}<|im_end|>"} for w in ("yes", "no", "maybe", "so")]
    argv = ["train", "--model", base, "--task", "causal-lm", "--epochs", "1", "--batch-size", "2", "--quiet"]
    line = cli_error(capsys, *argv, "--data", write_lines(tmp_path / "chat.jsonl", rows), "--out", tmp_path / "a")
    assert line == (f"error: {os.path.join(base, 'tokenizer.json')}: gives '<|im_end|>' the id {size + 1}, past the model's "
                    f"{size} embeddings (a token added to the tokenizer, not to the model); resize the model's embeddings "
                    "to the tokenizer (resize_token_embeddings), train and export again, or remove the token from the "
                    "tokenizer")
    plain = write_lines(tmp_path / "plain.jsonl", [{"text": r["prompt"]} for r in rows])  # uneven lengths: padded
    cli_ok(capsys, *argv, "--data", plain, "--out", tmp_path / "b")
    model = tf.AutoModelForCausalLM.from_pretrained(base)  # the fix, as it says
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(base)
    cli_ok(capsys, *argv, "--data", str(tmp_path / "chat.jsonl"), "--out", tmp_path / "c")


def test_a_gpt2_causal_lm_run_says_nothing_of_a_loss_type(text_model, tmp_path, capfd):
    """A hunt: every GPT-2 causal-LM run printed transformers' "`loss_type=None` was set in the config but it is
    unrecognized" (GPT2LMHeadModel's name maps to no loss; the user set none); the loss is the one it then takes."""
    import logging

    import transformers.utils.logging  # noqa: F401  it gives Logger its warning_once

    rows = [{"prompt": f"say {w}", "completion": f" {w}"} for w in ("yes", "no", "maybe", "so")]
    logging.Logger.warning_once.cache_clear()  # transformers says it once a process
    capfd.readouterr()
    train(model=text_model("gpt2"), task="causal-lm", data=write_lines(tmp_path / "d.jsonl", rows), out=str(tmp_path / "a"),
          epochs=1, batch_size=2, progress=False)
    assert "loss_type" not in "".join(capfd.readouterr())


def test_an_embedding_trained_whole_is_refused_before_training(text_model, tmp_path, capsys):
    """A hunt: --option modules_to_save=["embed_tokens","lm_head"] (the recipe for added tokens) trained and said ok,
    then export refused it ("use an adapter trained without it"); a LoRA target edgepeft does not adapt is refused
    before training. edgepeft.get_peft_model alike; an lm_head alone trains, as the fix says."""
    import edgepeft

    rows = write_lines(tmp_path / "d.jsonl", [{"text": f"say {w}"} for w in ("yes", "no", "maybe", "so")])
    argv = ["train", "--model", text_model("llama"), "--task", "causal-lm", "--data", rows, "--epochs", "1",
            "--batch-size", "2", "--quiet"]
    line = cli_error(capsys, *argv, "--option", 'modules_to_save=["embed_tokens","lm_head"]', "--out", tmp_path / "a")
    assert line == ("error: modules_to_save 'model.embed_tokens' is no Linear layer (Embedding): edgepeft exports only "
                    "Linear layers trained whole (a head's weight and bias are the adapter's slots); leave it out of "
                    "modules_to_save (tokens added: train on the model resized and saved with them, as --model)")
    assert not os.path.exists(tmp_path / "a")
    from tiny import load_reference_base

    with pytest.raises(ConfigError, match="modules_to_save 'model.embed_tokens' is no Linear layer"):
        edgepeft.get_peft_model(load_reference_base(text_model("llama"), "causal-lm"),
                                edgepeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    from training_helpers import cli_ok

    cli_ok(capsys, *argv, "--option", 'modules_to_save=["lm_head"]', "--out", tmp_path / "b")  # as it says


def test_a_python_tokenizer_trains_and_its_tokens_past_the_vocabulary_are_named(text_model):
    """A review: the vocabulary check read backend_tokenizer, which a Python tokenizer (BertJapaneseTokenizer) lacks:
    an AttributeError on every run of such a model."""
    import transformers as tf

    fast = tf.AutoTokenizer.from_pretrained(text_model("llama"))

    class Python:  # what a slow tokenizer offers: no backend_tokenizer
        def __init__(self):
            self.eos_token_id, self.pad_token_id, self.name_or_path = fast.eos_token_id, fast.pad_token_id, "slow"

        def __call__(self, *args, **kwargs):
            return fast(*args, **kwargs)

        def convert_ids_to_tokens(self, i):
            return fast.convert_ids_to_tokens(i)

    rows = [{"text": "say yes", "_line": 1}]
    assert Encoder(Python(), "causal-lm", 32, vocab=400).encode(rows, "d.jsonl")[0]["input_ids"]
    with pytest.raises(ConfigError, match=r"^slow/tokenizer.json: gives '.*' the id \d+, past the model's 5 embeddings"):
        Encoder(Python(), "causal-lm", 32, vocab=5).encode(rows, "d.jsonl")
