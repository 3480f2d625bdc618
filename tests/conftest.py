"""Shared fixtures: tiny model folders, HF PEFT adapters, shared exports, text models.

The helpers they build on live in modules grouped by what they need: ``tiny.py`` (torch and
transformers), ``peft_refs.py`` (HF PEFT), ``word_tokenizer.py`` (tokenizers), ``file_checks.py``.

Everything expensive is session-scoped and cached by its arguments, so the suite
exports each tiny base once. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from peft_refs import ADAPTER_SPECS, ia3_adapter, lora_adapter, peft_virtual_adapter, randomize_adapter, spec_adapter
from tiny import TASK_TYPES, default_task, load_reference_base, tiny_config
from word_tokenizer import TEMPLATE, build_tokenizer

@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("edgepeft")



@pytest.fixture(scope="session")
def tiny_base(workdir):
    """tiny_base(arch) -> folder of a tiny randomly initialised model (saved once)."""
    cache = {}

    def make(arch: str) -> str:
        if arch not in cache:
            import transformers as tf

            torch.manual_seed(1234)
            cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
            model = cls.from_config(tiny_config(arch))
            path = str(workdir / f"base-{arch}")
            model.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return make



@pytest.fixture(scope="session")
def peft_adapter(workdir, tiny_base):
    """peft_adapter(arch, name, task=None, num_labels=None, seed=0, **LoraConfig kwargs) -> HF PEFT adapter dir."""
    cache = {}

    def make(arch, name, task=None, num_labels=None, seed=0, **lora):
        import peft

        key = (arch, name)
        args = (task, num_labels, seed, lora)
        if key in cache and cache[key][1] != args:  # one dir per name: a second recipe would get the first's
            raise AssertionError(f"adapter {arch}/{name} was made with {cache[key][1]}, now asked with {args}")
        if key not in cache:
            task = task or default_task(arch)
            base = tiny_base(arch)
            model = load_reference_base(base, task, num_labels)
            config = peft.LoraConfig(task_type=TASK_TYPES[task], **lora)
            pm = peft.get_peft_model(model, config)
            randomize_adapter(pm, seed)
            pm.peft_config["default"].base_model_name_or_path = base
            path = str(workdir / "adapters" / arch / name)
            pm.save_pretrained(path)
            cache[key] = path, args
        return cache[key][0]

    return make



@pytest.fixture(scope="session")
def hf_reference(tiny_base):
    """hf_reference(arch, adapter_dir, task, num_labels=None) -> HF PEFT model (eval) for that adapter."""

    def make(arch, adapter_dir, task=None, num_labels=None):
        import peft

        task = task or default_task(arch)
        model = load_reference_base(tiny_base(arch), task, num_labels)
        return peft.PeftModel.from_pretrained(model, adapter_dir).eval()

    return make



@pytest.fixture(scope="session")
def shared_export(workdir, peft_adapter):
    """shared_export(arch) -> (OUT, {name: adapter dir}, report): exported once per session."""
    cache = {}

    def make(arch):
        if arch not in cache:
            from edgepeft.exporters import export

            dirs = {name: spec_adapter(peft_adapter, arch, name) for name, _ in ADAPTER_SPECS[arch]}
            out = str(workdir / f"out-{arch}")
            report = export(list(dirs.values()), out)
            cache[arch] = (out, dirs, report)
        return cache[arch]

    return make



@pytest.fixture(scope="session")
def virtual_export(workdir, tiny_base, peft_adapter):
    """virtual_export(arch) -> (OUT, {name: adapter dir}): HF PEFT prompt, prefix, prefix-with-projection
    (saved by HF PEFT while training, so the file holds the projected keys/values), LoRA and
    IA3 adapters, all exported into one base."""
    cache = {}

    def make(arch):
        if arch not in cache:
            from edgepeft.exporters import export

            root = workdir / "virtual" / arch
            base = tiny_base(arch)
            dirs = {
                "prompt": peft_virtual_adapter(root / "prompt", base, "prompt", seed=1, num_virtual_tokens=4),
                "prefix": peft_virtual_adapter(root / "prefix", base, "prefix", seed=2, num_virtual_tokens=3),
                "prefix_mlp": peft_virtual_adapter(root / "prefix_mlp", base, "prefix", seed=3, num_virtual_tokens=5,
                                                   prefix_projection=True, encoder_hidden_size=16),
                "lora": peft_adapter(arch, "qv-for-virtual", seed=81, r=4),
                "ia3": ia3_adapter(root / "ia3", base, seed=82),
            }
            out = str(workdir / f"out-{arch}-virtual")
            report = export(list(dirs.values()), out, names=list(dirs))
            cache[arch] = (out, dirs, report)
        return cache[arch]

    return make



@pytest.fixture(scope="session")
def mixed_decoder(workdir, tiny_base):
    """(OUT, {name: adapter dir}): a tiny Llama with two LoRA adapters (different targets and ranks), IA3,
    prompt and prefix adapters in one base (test_mixed_batches.py, test_adapter_budget.py)."""
    from edgepeft.exporters import export

    root, base = workdir / "mixed", tiny_base("llama")
    dirs = {"lora_qv": lora_adapter(root / "lora_qv", base, "causal-lm", 61, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "lora_all": lora_adapter(root / "lora_all", base, "causal-lm", 62, r=2, lora_alpha=4, target_modules="all-linear",
                              rank_pattern={"down_proj": 3}),
            "ia3": ia3_adapter(root / "ia3", base, 63),
            "prompt": peft_virtual_adapter(root / "prompt", base, "prompt", seed=64, num_virtual_tokens=3),
            "prefix": peft_virtual_adapter(root / "prefix", base, "prefix", seed=65, num_virtual_tokens=2)}
    out = str(root / "out")
    export(list(dirs.values()), out, names=list(dirs))
    return out, dirs


@pytest.fixture(scope="session")
def text_model(workdir):
    """text_model(arch) -> a tiny model folder with a BPE tokenizer learned from the sample texts."""
    cache = {}

    def make(arch):
        if arch in cache:
            return cache[arch]
        import transformers as tf
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        texts = []
        data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "data")
        for name in sorted(os.listdir(data)):
            if name.endswith(".jsonl"):
                with open(os.path.join(data, name), encoding="utf-8") as f:
                    texts += [row["text"] for row in map(json.loads, filter(str.strip, f)) if "text" in row]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
        from tokenizers import decoders

        tok.decoder = decoders.ByteLevel()
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                          unk_token="<unk>")
        # initializer_range 0.3: a frozen random head with the default 0.02 cannot give confident logits
        common = dict(vocab_size=tok.get_vocab_size(), pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      initializer_range=0.3)
        torch.manual_seed(7)  # the same weights every run
        if arch == "llama":
            config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    intermediate_size=64, max_position_embeddings=128, **common)
            model = tf.AutoModelForCausalLM.from_config(config)
        elif arch == "gpt2":
            config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)  # head size 16
            model = tf.AutoModelForCausalLM.from_config(config)
        else:
            config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=128, **common)
            model = tf.AutoModel.from_config(config)
        path = str(workdir / f"text-{arch}")
        model.save_pretrained(path)
        fast.save_pretrained(path)
        cache[arch] = path
        return path

    return make



@pytest.fixture(scope="session")
def text_export(tmp_path_factory, tiny_base):
    """(OUT, tokenizer, base dir): a tiny llama copy with tokenizer files, one LoRA adapter 'tok' exported."""
    import peft

    from edgepeft.exporters import export

    root = tmp_path_factory.mktemp("textgen")
    base = str(root / "base-llama-tok")
    shutil.copytree(tiny_base("llama"), base)
    tok = build_tokenizer()
    tok.save(os.path.join(base, "tokenizer.json"))
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "[PAD]", "chat_template": TEMPLATE,
                   "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    model = load_reference_base(base, "causal-lm")
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                   target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_adapter(pm, 21)
    pm.peft_config["default"].base_model_name_or_path = base
    adapter_dir = str(root / "adapter-tok")
    pm.save_pretrained(adapter_dir)
    out = str(root / "out")
    export([adapter_dir], out, names=["tok"])
    assert os.path.isfile(os.path.join(out, "base", "tokenizer.json"))
    return out, tok, base



@pytest.fixture(scope="session")
def text_rt(text_export):
    from edgepeft.runtimes import Runtime

    return Runtime(text_export[0])


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt as in a terminal, even where the suite was started with SIGINT ignored (a
    background job of a non-interactive shell inherits that, and the Ctrl-C tests then saw no interrupt at all)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def two_renames(monkeypatch):
    """A folder replaced by two renames (the old aside, the new in), as where the system cannot exchange two folders
    in one step (Windows, a network file system): the commits' tests that stop or fail between them."""
    import edgepeft.files

    monkeypatch.setattr(edgepeft.files, "exchanged", lambda a, b: False)
