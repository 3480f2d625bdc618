"""int8 and int4 bases against float32 on real weights: a trained MiniLM classifier's held-out predictions.

    HF_HUB_OFFLINE=1 python samples/quantized_accuracy.py [--task intent|sentiment] [--work quant-out]

Trains a LoRA classifier with edgepeft's defaults on the sample data (3 epochs), exports it on a float32, an
int8 and an int4 base, and prints per base: held-out accuracy, agreement of its predictions with float32's,
the logits' max |difference| and relative RMS error against float32, and the base's size on disk.
"""
import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import edgepeft  # noqa: E402
from edgepeft.exporters import export  # noqa: E402
from edgepeft.exporters.quantize import relative_error  # noqa: E402
from edgepeft.exporters.validate import check_tolerances  # noqa: E402
from edgepeft.runtimes import Runtime  # noqa: E402
from edgepeft.runtimes.describe import folder_bytes  # noqa: E402
from edgepeft.training.data import read_jsonl  # noqa: E402
from sample_folder import fresh_folder, run  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="intent", choices=["intent", "sentiment"])
    ap.add_argument("--work", default="quant-out", help="emptied first where a sample made it (default %(default)s)")
    ap.add_argument("--qtol", type=float, default=0.2, help="the export's tolerance for the quantized check")
    args = ap.parse_args()
    check_tolerances(0, args.qtol)  # before minutes of training: export refused it only after them
    fresh_folder(args.work, ap.get_default("work"))
    adapter = os.path.join(args.work, args.task)
    log = edgepeft.train(model=edgepeft.minilm_path(), task="seq-cls", method="lora",
                         data=os.path.join(DATA, f"{args.task}_train.jsonl"),
                         eval_data=os.path.join(DATA, f"{args.task}_eval.jsonl"), out=adapter, progress=False)
    rows = read_jsonl(os.path.join(DATA, f"{args.task}_eval.jsonl"), "seq-cls")
    logits, sizes = {}, {}
    for kind in ("float32", "int8", "int4"):
        out = os.path.join(args.work, f"export-{kind}")
        export([adapter], out, quantize=None if kind == "float32" else kind, qtol=args.qtol)
        rt = Runtime(out)
        ids, mask = rt.tokenizer.encode([r["text"] for r in rows])
        logits[kind] = rt.forward(ids, mask, adapter=args.task)["logits"]
        sizes[kind] = folder_bytes(os.path.join(out, "base"))
    labels = Runtime(os.path.join(args.work, "export-float32")).labels(args.task)
    gold = np.array([labels.index(r["label"]) for r in rows])
    print(f"{args.task}: {len(rows)} held-out rows, best epoch {log['best']['epoch']} (eval accuracy "
          f"{log['best']['value']:.3f} in PyTorch)")
    print("| base | held-out accuracy | predictions equal to float32's | max abs logit diff | relative error | base size (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, z in logits.items():
        agree = float((z.argmax(-1) == logits["float32"].argmax(-1)).mean())
        diff = float(np.abs(z - logits["float32"]).max())
        print(f"| {kind} | {(z.argmax(-1) == gold).mean():.3f} | {agree:.3f} | {diff:.3f} | "
              f"{relative_error(z, logits['float32']):.4f} | {sizes[kind] / 1e6:.1f} ({sizes[kind] / sizes['float32']:.2f}x) |")


if __name__ == "__main__":
    run(main)
