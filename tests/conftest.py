"""Shared fixtures: tiny models built from configs, HF PEFT adapters, shared exports.

Everything expensive is session-scoped and cached by its arguments, so the suite
exports each tiny base once. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

ARCHS = ["llama", "qwen2", "gpt2", "bert"]
DECODER_ARCHS = ["llama", "qwen2", "gpt2"]
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "feature-extraction": "FEATURE_EXTRACTION"}


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, max_position_embeddings=64, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=64, **common)
    raise KeyError(arch)


def default_task(arch: str) -> str:
    return "feature-extraction" if arch == "bert" else "causal-lm"


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


def load_reference_base(path: str, task: str, num_labels: int | None = None):
    """The base as edgepeft loads it (same seed), optionally with a head of num_labels outputs."""
    from edgepeft.models import load_base

    model = load_base(path, task)
    if num_labels is not None and task == "seq-cls":
        head_name = "classifier" if hasattr(model, "classifier") else "score"
        head = getattr(model, head_name)
        torch.manual_seed(99)
        setattr(model, head_name, torch.nn.Linear(head.in_features, num_labels, bias=head.bias is not None))
        model.config.num_labels = num_labels
    return model.eval()


def _randomize(model, seed: int, keys: tuple, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in keys):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def randomize_adapter(model, seed: int) -> None:
    """Give LoRA B and trained heads non-zero values so parity tests can fail."""
    _randomize(model, seed, ("lora_B", "lora_A", "modules_to_save"), 0.2)


def randomize_bottleneck(model, seed: int, scale: float = 0.2) -> None:
    """Random down- and up-projections for edgepeft bottleneck adapters: not the identity, so parity tests can fail."""
    _randomize(model, seed, ("adapter_down", "adapter_up"), scale)


def hf_generate(model, ids, mask, **kwargs):
    """HF generate -> (sequences (B, T+n), raw per-step logits (n, B, V))."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences.numpy(), torch.stack(out.logits).float().numpy()


def runtime_step_logits(rt, name, prompt, pmask, ids) -> np.ndarray:
    """The runtime's prefill and cached decode steps, teacher-forced with ``ids`` (prompt + new tokens):
    each step's last-position logits, (new tokens, B, V)."""
    start = prompt.shape[1]
    steps = rt.step_logits(prompt, pmask, adapter=name)
    logits = [next(steps)] + [steps.send(ids[:, start + i]) for i in range(ids.shape[1] - start - 1)]
    steps.close()
    return np.stack(logits)


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


def train_steps(model, lr: float, steps: int = 30) -> list[float]:
    """Causal-LM losses of ``steps`` AdamW steps on a fixed random batch, training only what requires grad."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def sample_batch(vocab=128, batch=2, seq=9, seed=3, pad=0):
    """Token ids and a mask: row 0 full, every later row left-padded by 2 more tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = pad
    return ids, mask


def torch_outputs(model, ids, mask, field):
    from edgepeft.models import call_kwargs

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), return_dict=True,
                    **call_kwargs(model.config))
    return getattr(out, field).float().numpy()


def max_diff_valid(a, b, mask=None):
    """Max |a - b| over real (unpadded) tokens; whole arrays when mask is None."""
    if mask is None:
        return float(np.abs(a - b).max())
    valid = mask.astype(bool)
    return float(np.abs(a[valid] - b[valid]).max())


# The shared export per architecture: one base, three LoRA adapters of different
# ranks/targets/options. Tests that only read it use this; tests that change an
# export make their own folder.
ADAPTER_SPECS = {
    "llama": [
        ("qv", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("all", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
        ("mlp", dict(r=2, lora_alpha=4, target_modules=["gate_proj", "down_proj"], rank_pattern={"down_proj": 3})),
    ],
    "qwen2": [
        ("qv", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("all", dict(r=6, lora_alpha=12, target_modules="all-linear")),
    ],
    "gpt2": [
        ("attn", dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
        ("all", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_proj", "c_fc"])),
    ],
    "bert": [
        ("qv", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
        ("all", dict(r=8, lora_alpha=8, target_modules="all-linear")),
    ],
}


def spec_adapter(peft_adapter, arch: str, name: str) -> str:
    """The HF PEFT dir of ADAPTER_SPECS[arch]'s adapter ``name`` (the one shared_export uses)."""
    i, kw = next((i, kw) for i, (n, kw) in enumerate(ADAPTER_SPECS[arch]) if n == name)
    return peft_adapter(arch, name, seed=i + 1, **kw)


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


# ---------------------------------------------------------------- virtual tokens (prompt / prefix tuning)
VIRTUAL_ARCHS = ["llama", "qwen2", "gpt2"]


def randomize_prompt_encoder(model, seed: int, scale: float = 1.0) -> None:
    """Random prompt/prefix parameters (HF PEFT's ``prompt_encoder`` or edgepeft's) so parity tests can fail."""
    _randomize(model, seed, ("prompt_encoder",), scale)


def peft_virtual_adapter(path, base: str, kind: str, seed: int, task: str = "causal-lm", **kw) -> str:
    """Save an HF PEFT prompt ("prompt") or prefix ("prefix") adapter with random weights to ``path``."""
    import peft

    cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    pm = peft.get_peft_model(load_reference_base(base, task), cls(task_type=TASK_TYPES[task], **kw))
    randomize_prompt_encoder(pm, seed)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(path))
    return str(path)


def greedy_reference(model, ids, mask, new_tokens: int):
    """Greedy ids and every step's last logits, recomputing the whole sequence with ``model`` (no cache).

    Positions come from the attention mask as transformers' generate makes them; HF PEFT
    shifts them by the prefix (prefix tuning) or drops them (prompt tuning). This is what
    HF PEFT's ``generate`` computes; its cached generate for prompt learning is broken on
    transformers 5 (the prefix is dropped at prefill), so tests use this instead.
    """
    from edgepeft.tuners.virtual import mask_positions

    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    steps = []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask)).logits[:, -1]
            steps.append(logits.float().numpy())
            token = logits.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids.numpy(), np.stack(steps)


def _ia3_adapter(path, base: str, seed: int) -> str:
    import peft

    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.IA3Config(task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(path))
    return str(path)


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
                "ia3": _ia3_adapter(root / "ia3", base, seed=82),
            }
            out = str(workdir / f"out-{arch}-virtual")
            report = export(list(dirs.values()), out, names=list(dirs))
            cache[arch] = (out, dirs, report)
        return cache[arch]

    return make


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
                    texts += [json.loads(line)["text"] for line in f if line.strip()]
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
        if arch == "llama":
            config = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, max_position_embeddings=128, **common)
            model = tf.AutoModelForCausalLM.from_config(config)
        else:
            config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=128, **common)
            model = tf.AutoModel.from_config(config)
        path = str(workdir / f"text-{arch}")
        torch.manual_seed(7)
        model.save_pretrained(path)
        fast.save_pretrained(path)
        cache[arch] = path
        return path

    return make


# ---------------------------------------------------------------- text: a tiny llama with a word-level tokenizer
WORDS = [f"w{i}" for i in range(8, 128)]
SPECIAL = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "w10 w20 w30 w40"


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = dict(SPECIAL)
    vocab.update({":": 4, "user": 5, "assistant": 6, "system": 7})
    vocab.update({w: i for i, w in enumerate(WORDS, start=8)})
    assert len(vocab) == 128 and sorted(vocab.values()) == list(range(128))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(SPECIAL))
    return tok


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


def decode(tok, ids):
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def layer_nodes(out: str, ops) -> tuple[list, list]:
    """(names of ``ops`` nodes inside any layer, every node) of OUT's base graph: Llama/Qwen2 ``layers.N``,
    GPT-2 ``h.N``, BERT ``layer.N``."""
    import re

    import onnx

    graph = onnx.load(os.path.join(out, "base", "model.onnx"), load_external_data=False).graph
    inside = [n.name for n in graph.node if n.op_type in ops and re.search(r"/(layers|h|layer)\.\d+/", n.name)]
    return inside, list(graph.node)
