"""HF PEFT reference adapters with random (non-neutral) weights, and the references parity tests compare with."""
from __future__ import annotations

import numpy as np
import torch

from tiny import DECODER_ARCHS, TASK_TYPES, load_reference_base


def _randomize(model, seed: int, keys: tuple, scale: float, around: float = 0.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in keys):
                p.copy_(around + torch.randn(p.shape, generator=g) * scale)


def randomize_adapter(model, seed: int) -> None:
    """Give LoRA B and trained heads non-zero values so parity tests can fail."""
    _randomize(model, seed, ("lora_B", "lora_A", "modules_to_save"), 0.2)


def randomize_ia3(model, seed: int) -> None:
    """IA3 scales around 1 (1 is the identity, as HF PEFT starts them), so parity tests can fail."""
    _randomize(model, seed, ("ia3_l",), 0.3, around=1.0)


def randomize_bottleneck(model, seed: int, scale: float = 0.2) -> None:
    """Random down- and up-projections for edgepeft bottleneck adapters: not the identity, so parity tests can fail."""
    _randomize(model, seed, ("adapter_down", "adapter_up"), scale)


def randomize_prompt_encoder(model, seed: int, scale: float = 1.0) -> None:
    """Random prompt/prefix parameters (HF PEFT's ``prompt_encoder`` or edgepeft's) so parity tests can fail."""
    _randomize(model, seed, ("prompt_encoder",), scale)


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


# ---------------------------------------------------------------- virtual tokens (prompt / prefix tuning)
VIRTUAL_ARCHS = DECODER_ARCHS


def lora_adapter(path, base: str, task: str, seed: int, num_labels=None, **kw) -> str:
    """Save an HF PEFT LoRA adapter (``LoraConfig(**kw)``) with random A, B and heads to ``path``."""
    import peft

    pm = peft.get_peft_model(load_reference_base(base, task, num_labels), peft.LoraConfig(task_type=TASK_TYPES[task], **kw))
    randomize_adapter(pm, seed)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(path))
    return str(path)


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


def ia3_adapter(path, base: str, seed: int) -> str:
    import peft

    pm = peft.get_peft_model(load_reference_base(base, "causal-lm"), peft.IA3Config(task_type="CAUSAL_LM"))
    randomize_ia3(pm, seed)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(str(path))
    return str(path)



def bottleneck_adapter(path, base: str, seed: int) -> str:
    """An edgepeft houlsby bottleneck adapter with random (non-identity) projections (HF PEFT has no such method)."""
    import edgepeft

    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"),
                                    edgepeft.BottleneckConfig(task_type="CAUSAL_LM", placement="houlsby",
                                                              non_linearity="relu", bottleneck_size=8))
    randomize_bottleneck(model, seed)
    model.save_pretrained(str(path))
    return str(path)


def bert_lora_classifier(source: str, root, id2label: dict, seed: int = 3, **config) -> tuple:
    """(base, adapter dir, the PEFT model): a tiny BERT saved as a trained classifier (``id2label``, other config
    fields such as problem_type) in ``root``/base, with ``source``'s tokenizer, and an HF PEFT LoRA on it."""
    import shutil

    import peft
    import transformers as tf

    base, adapter = str(root / "base"), str(root / "adapter")
    shutil.copytree(source, base)  # its tokenizer; the model saved over it is a classifier
    labels = {v: k for k, v in id2label.items()}
    cfg = tf.AutoConfig.from_pretrained(base, num_labels=len(id2label), id2label=id2label, label2id=labels, **config)
    torch.manual_seed(seed)
    tf.BertForSequenceClassification(cfg).save_pretrained(base)
    pm = peft.get_peft_model(tf.BertForSequenceClassification.from_pretrained(base),
                             peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]))
    randomize_adapter(pm, 1)
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(adapter)
    return base, adapter, pm
