"""Two generative adapters on one small decoder: train, export the base once, generate with each per request.

    python samples/train_generative.py [--model DECODER_DIR] [--out gen-out]

The tasks answer in words: "Request: ...\nIntent:" -> " alarm", "Review: ...\nSentiment:" -> " positive".
Without --model (no hub here) the script builds a small Llama and a BPE tokenizer from the
sample texts: its weights are random, so the adapters learn the tasks from scratch. Pass
any local Llama/Qwen2/GPT-2 folder to train on real pretrained weights instead.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.runtimes.access import inside  # noqa: E402
from edgepeft.training.data import read_jsonl  # noqa: E402
from sample_folder import fresh_folder, positive, run  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
PROMPTS = {"intent": "Request: {}\nIntent:", "sentiment": "Review: {}\nSentiment:"}
METHODS = {"intent": ("lora", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
           "sentiment": ("lora", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "lora_dropout": 0.1})}


def rows(task, split):
    return read_jsonl(os.path.join(DATA, f"{task}_{split}.jsonl"), "seq-cls")


def small_decoder(path):
    """A 4-layer Llama (hidden 256) with a byte-level BPE tokenizer learned from the sample texts."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [r["text"] for t in PROMPTS for s in ("train", "eval") for r in rows(t, s)] + list(PROMPTS.values())
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    config = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=512, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, initializer_range=0.1)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def jsonl(task, split):
    """``samples/data/<task>_generate_<split>.jsonl``: the classification rows as {"prompt", "completion"} (PROMPTS)."""
    return os.path.join(DATA, f"{task}_generate_{split}.jsonl")


def accuracy(rt, task, adapter):
    held_out = rows(task, "eval")
    answers = rt.generate_text([PROMPTS[task].format(r["text"]) for r in held_out], adapter=adapter, max_new_tokens=6)
    return sum(a.strip() == r["label"] for a, r in zip(answers, held_out)) / len(held_out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local decoder folder (default: build a small random Llama)")
    p.add_argument("--out", default="gen-out", help="emptied first where a sample made it (default %(default)s)")
    p.add_argument("--epochs", type=positive, default=12)
    args = p.parse_args()
    if args.model and args.out and inside(os.path.realpath(args.model), os.path.realpath(args.out)):  # emptied with it
        sys.exit(f"error: {args.model}: lies inside --out {args.out}, which a run empties; copy the model elsewhere")
    fresh_folder(args.out, p.get_default("out"))
    model = args.model or small_decoder(os.path.join(args.out, "small-llama"))
    adapters = []
    for task, (method, options) in METHODS.items():
        print(f"train {task} ({method}) on {model}")
        out = os.path.join(args.out, task)
        edgepeft.train(model=model, task="causal-lm", method=method, data=jsonl(task, "train"),
                       eval_data=jsonl(task, "eval"), out=out, epochs=args.epochs, lr=2e-3,
                       batch_size=16, options=options, progress=False)
        adapters.append(out)
    print("export the base once plus both adapters")
    export(adapters, os.path.join(args.out, "export"))
    rt = Runtime(os.path.join(args.out, "export"))
    for task in PROMPTS:
        print(f"{task:9} held-out exact match: base {accuracy(rt, task, None):.3f} -> adapter {accuracy(rt, task, task):.3f}")
    for task, text in [("intent", "wake me at 6:30"), ("sentiment", "cold soup and a rude waiter"),
                       ("intent", "play some jazz")]:
        print(f"[{task}] {text!r} ->{rt.generate_text(PROMPTS[task].format(text), adapter=task, max_new_tokens=6)!r}")


if __name__ == "__main__":
    run(main)
