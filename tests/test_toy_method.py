"""Adding a method touches its own folder only: ``tests/toy_bias`` (a learned per-layer output bias) registers
itself, then trains, saves, exports and runs through the public paths, as the built-in methods do."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from peft_refs import greedy_reference
from tiny import load_reference_base, max_diff_valid, sample_batch, torch_outputs
from file_checks import write_lines
from training_helpers import REPO, seq_cls_rows

import edgepeft
from edgepeft.exporters import export
from edgepeft.runtimes import Runtime

import toy_bias  # noqa: F401  (registers the "toybias" method)


def test_a_method_from_the_test_folder_trains_saves_exports_and_runs(text_model, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(32))
    adapter = str(tmp_path / "bias")
    log = edgepeft.train(model=text_model("bert"), task="seq-cls", method="toybias", data=data, eval_data=data,
                         out=adapter, epochs=3, batch_size=8, progress=False)
    assert log["args"]["lr"] == toy_bias.ToyBiasConfig.default_lr  # its own default rate
    assert min(e["loss"] for e in log["evals"][1:]) < log["evals"][0]["loss"]  # the best epoch beats the untrained adapter
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["peft_type"] == "TOY_BIAS"

    out = str(tmp_path / "out")
    export([adapter], out)
    rt = Runtime(out)  # the runtime knows nothing of the method: it binds the slots the manifest declares
    assert rt.adapter_info("bias")["methods"] == ["toybias", "head"]
    ids, mask = rt.tokenizer.encode(["sample number 3 sounds good", "bad"])
    model = edgepeft.PeftModel.from_pretrained(load_reference_base(text_model("bert"), "seq-cls", 2), adapter).eval()
    ref = torch_outputs(model, ids, mask, "logits")
    ours = rt.forward(ids, mask, adapter="bias")["logits"]
    assert np.abs(ours - ref).max() <= 1e-4
    assert rt.classify("sample number 3 sounds good", adapter="bias")["label"] in ("neg", "pos")

    merged = str(tmp_path / "merged")  # the tuner's merge folds the bias into the layer's own
    export([adapter], merged, merge=True)
    assert np.abs(Runtime(merged).forward(ids, mask)["logits"] - ref).max() <= 1e-4


def test_a_toy_adapter_generates_on_a_decoder_as_pytorch_does(tiny_base, tmp_path):
    base = tiny_base("llama")
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"),
                                    toy_bias.ToyBiasConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "toy_bias" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.save_pretrained(tmp_path / "bias")
    out = str(tmp_path / "out")
    export([str(tmp_path / "bias")], out)
    rt = Runtime(out)
    prompt, pmask = sample_batch(batch=2, seq=5)
    expected, _ = greedy_reference(model.eval(), prompt, pmask, 6)
    np.testing.assert_array_equal(rt.generate(prompt, pmask, adapter="bias", max_new_tokens=6, eos_token_id=[]), expected)
    assert (rt.generate(prompt, pmask, max_new_tokens=6, eos_token_id=[]) != expected).any()  # it does act


def test_no_shared_code_names_the_toy_method():
    for folder in ("edgepeft", "exporters", "runtimes"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(root, f), encoding="utf-8") as fh:
                        source = fh.read()
                    assert "toybias" not in source and "TOY_BIAS" not in source, f


def test_a_toy_adapter_and_a_lora_on_the_same_layers_share_one_export(tiny_base, tmp_path):
    """Another method's layer wrapping a module the toy wrapped first (LoRA's sizes come from the layer underneath):
    both adapters in one model and in one export, each as PyTorch computes it."""
    base = tiny_base("llama")
    model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), toy_bias.ToyBiasConfig(task_type="CAUSAL_LM"))
    model.add_adapter("lora", edgepeft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["down_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "toy_bias" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    model.save_pretrained(tmp_path / "both")  # the toy in tmp_path/both, the LoRA in tmp_path/both/lora
    out = str(tmp_path / "out")
    export([str(tmp_path / "both"), str(tmp_path / "both" / "lora")], out, names=["bias", "lora"])
    rt = Runtime(out)
    ids, mask = sample_batch(batch=2, seq=6)
    for name in ("bias", "lora"):
        reference = edgepeft.PeftModel.from_pretrained(load_reference_base(base, "causal-lm"), str(
            tmp_path / "both" / ("lora" if name == "lora" else ""))).eval()
        ref = torch_outputs(reference, ids, mask, "logits")
        assert max_diff_valid(rt.forward(ids, mask, adapter=name)["logits"], ref, mask) <= 1e-4, name  # padding aside
        assert max_diff_valid(rt.forward(ids, mask)["logits"], ref, mask) > 1e-3, name  # the adapter acts


def test_a_slot_spec_must_carry_its_methods_name():
    """The slots' name is the method's (it prefixes every slot and names their method): one left out is refused
    when the method registers, not later with advice to register it."""
    import pytest

    from edgepeft.errors import ConfigError
    from edgepeft.registry import Method, SlotSpec, register_method

    with pytest.raises(ConfigError, match=r"SlotSpec.name is ''; set it to the method's name 'unnamed'"):
        register_method(Method(name="unnamed", config_cls=toy_bias.ToyBiasConfig, tuner=toy_bias.ToyBiasTuner(),
                               slots=SlotSpec()))


def test_a_method_named_as_another_or_with_its_peft_type_is_refused(monkeypatch):
    """Found by a hunt: a plugin named "ia3" exported every real IA3 adapter with its slots (a traceback); one whose
    peft_type is "LORA" took edgepeft.LoraConfig's place and loaded every LoRA folder as its config."""
    import dataclasses

    from edgepeft import registry
    from edgepeft.errors import ConfigError
    from edgepeft.registry import Method, register_method

    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))  # nothing stays registered
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))

    def plugin(name, peft_type):
        config = type("MyConfig", (toy_bias.ToyBiasConfig,), {"peft_type_name": peft_type})
        slots = type("MySlots", (toy_bias.ToyBiasSlots,), {"name": name})()
        return Method(name=name, config_cls=dataclasses.dataclass(config), tuner=toy_bias.ToyBiasTuner(), slots=slots)

    for name, peft_type, said in (
            ("ia3", "IA3_BIAS", "name 'ia3' is the ia3 method's (IA3Config)"),
            ("mybias", "LORA", "MyConfig.peft_type_name 'LORA' is the lora method's (LoraConfig)"),
            ("head", "HEAD_BIAS", "name 'head' is the slot spec HeadSlots's"),
            ("prompt_tuning", "MY_PROMPT", "name 'prompt_tuning' is the prompt method's (PromptTuningConfig)")):
        with pytest.raises(ConfigError, match=re.escape(said)):
            register_method(plugin(name, peft_type))
    assert registry.method_for(edgepeft.LoraConfig(task_type="CAUSAL_LM")).name == "lora"
    from edgepeft.training.arguments import find_method

    assert find_method("prompt_tuning").name == "prompt"  # --method's HF PEFT name still the built-in's
    assert register_method(toy_bias.TOY_BIAS) is toy_bias.TOY_BIAS  # the same method again (a reload): taken


def test_the_cli_trains_a_method_of_ones_own_with_its_package_imported_first(text_model, tmp_path):
    """The command docs/adding-a-method.md gives for the CLI: the package imported, then edgepeft's main."""
    import subprocess
    import sys

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(8))
    code = (f"import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r}); "
            "import toy_bias, edgepeft.cli; edgepeft.cli.main()")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--model", text_model("bert"), "--task", "seq-cls",
                           "--method", "toybias", "--data", data, "--out", str(tmp_path / "mine"), "--epochs", "1",
                           "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "mine" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "TOY_BIAS"


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists packages by hand (edgepeft.exporters and edgepeft.runtimes live outside edgepeft/): a
    method folder added under edgepeft/tuners/ must be listed too, or a built wheel lacks it."""
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML (pyproject: 3.10 or newer)")

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        setup = tomllib.load(f)["tool"]["setuptools"]
    listed = set(setup["packages"])
    folders = {"edgepeft": "edgepeft", **{name: path for name, path in setup["package-dir"].items()}}
    found = set()
    for package, folder in folders.items():
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in files and "__pycache__" not in root:
                relative = os.path.relpath(root, os.path.join(REPO, folder))
                found.add(package if relative == "." else f"{package}.{relative.replace(os.sep, '.')}")
    assert found == listed


def test_the_checkouts_edgepeft_imports_whole_without_the_editable_install():
    """A hunt: with a wheel installed (not editable), python run in a checkout's root found the checkout's edgepeft/,
    which lacks exporters/ and runtimes/ (pyproject's package-dir): `python -m edgepeft`, README's quickstart and the
    device tier failed with "No module named 'edgepeft.runtimes'". The editable install's finder hid it."""
    import subprocess
    import sys

    script = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
              f"sys.path.insert(0, {REPO!r}); import edgepeft.runtimes, edgepeft.exporters, edgepeft.runtimes.text; "
              "print(edgepeft.runtimes.__file__, edgepeft.exporters.__file__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [os.path.join(REPO, "runtimes", "__init__.py"),
                                   os.path.join(REPO, "exporters", "__init__.py")]


def test_a_plugin_slot_stacked_by_adapters_keeps_its_zeros_for_rows_without_it(tiny_base, tmp_path):
    """A newcomer hunt: a plugin's slot stacked by adapters as IA3's are, its neutral zeros (an added bias), was
    stacked with IA3's ones for the rows without that adapter: the base row 2.6 off, silently. Each row of a mixed
    batch equals its own call now; a slot so stacked whose neutral is the base's tensor is refused."""
    from toy_bias.stacked import ToyStackConfig

    from edgepeft.runtimes.manifest import Slot
    from edgepeft.runtimes.slot_checks import slot_table_errors

    base, dirs = tiny_base("llama"), []
    for seed in (1, 2):
        model = edgepeft.get_peft_model(load_reference_base(base, "causal-lm"), ToyStackConfig(task_type="CAUSAL_LM"))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "toy_bias" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        model.save_pretrained(tmp_path / f"s{seed}")
        dirs.append(str(tmp_path / f"s{seed}"))
    export(dirs, str(tmp_path / "out"))
    rt, (ids, mask), rows = Runtime(str(tmp_path / "out")), sample_batch(batch=4), ["s1", None, "s2", "s1"]
    mixed = rt.forward(ids, mask, adapter=rows)["logits"]
    for i, name in enumerate(rows):
        alone = rt.forward(ids[i:i + 1], mask[i:i + 1], adapter=name)["logits"]
        assert max_diff_valid(mixed[i:i + 1], alone, mask[i:i + 1]) <= 1e-5, (name, np.abs(mixed[i] - alone[0]).max())
    stacked = [Slot("b", "m", "bias", "x", ("n", 4), "float32", "base", stack_axis=0, selector="r"),
               Slot("r", "m", "rows", "batch", ("batch", "n"), "float32", "ones", selects="adapters")]
    assert slot_table_errors(stacked, []) == ["slot 'b': a slot whose selector selects adapters is neutral ones or zeros "
                                              "(a row without the adapter reads that value in a mixed batch)"]


def test_an_interrupted_plugin_run_prints_a_resume_command_that_imports_the_plugin(text_model, tmp_path):
    """A newcomer hunt: a plugin's run, started as the docs say (python -c "import PLUGIN, edgepeft.cli; ..."),
    printed `edgepeft train ... --method toybias ... --resume`, which answered "method 'toybias' is not supported".
    The command it prints now imports the plugin first, and run as printed it finishes the run; torchrun's too."""
    import shlex
    import subprocess
    import sys

    from edgepeft.training.arguments import TrainingArguments

    data = write_lines(tmp_path / "d.jsonl", seq_cls_rows(16))
    out = str(tmp_path / "out")
    stop = ("import sys, toy_bias, edgepeft.cli\nfrom edgepeft.training.trainer import Trainer\nend = Trainer._end_epoch\n"
            "def stop(self, *a):\n    end(self, *a)\n    raise KeyboardInterrupt  # Ctrl-C after epoch 1\n\n"
            "Trainer._end_epoch = stop\nedgepeft.cli.main()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    args = ["train", "--model", text_model("bert"), "--task", "seq-cls", "--method", "toybias", "--data", data, "--out",
            out, "--epochs", "2", "--batch-size", "8", "--quiet"]
    stopped = subprocess.run([sys.executable, "-c", stop, *args], capture_output=True, text=True, env=env)
    command = shlex.split(stopped.stderr.splitlines()[-1].split("continue with: ")[1])
    assert command[:3] == ["python", "-c", "import toy_bias.config, edgepeft.cli; edgepeft.cli.main()"], stopped.stderr
    resumed = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0 and os.path.isfile(os.path.join(out, "adapter_model.safetensors")), resumed.stderr
    torchrun = TrainingArguments(model="m", task="seq-cls", method="toybias", data="d", out="o").command(processes=2)
    assert torchrun.startswith("torchrun --nproc-per-node 2 --no-python python -c 'import toy_bias.config, edgepeft.cli; "
                               "edgepeft.cli.main()' train --model m")


def test_a_method_missing_a_hook_is_refused_naming_it_and_one_without_merge_does_not_merge():
    """A newcomer hunt: a spec without sample, or a tuner without merge, ended an export (--merge) in a traceback
    whose last line was a bare NotImplementedError."""
    from edgepeft.errors import ConfigError, UnsupportedMethodError
    from edgepeft.registry import Method, SlotSpec, Tuner, register_method

    class HalfTuner(Tuner):
        pass

    class HalfSlots(SlotSpec):
        name = "half"

        def slot_table(self, model, config, groups=()):
            return []

    with pytest.raises(ConfigError, match=r"^HalfTuner.inject, HalfSlots.install, HalfSlots.values, HalfSlots.sample "
                                          r"not implemented: a method's tuner implements inject"):
        register_method(Method(name="half", config_cls=toy_bias.ToyBiasConfig, tuner=HalfTuner(), slots=HalfSlots()))
    with pytest.raises(UnsupportedMethodError, match="^HalfTuner has no merge: .*; export without --merge$"):
        HalfTuner().merge(None, "default")
    from edgepeft.training.arguments import find_method

    with pytest.raises(ConfigError, match=r"method 'lntuning' is not supported; use one of .*\(a method of your own: "
                                          r"import its package first, `python -c \"import PACKAGE, edgepeft.cli; "):
        find_method("lntuning")  # a plugin's, its package not imported: only the built-ins were named


def test_a_slot_specs_wrong_values_are_named_as_its_own_mistake(tiny_base, tmp_path, monkeypatch):
    """A newcomer hunt: a spec's value of the wrong shape, a neutral value missing, or values filling no slot were told
    as damaged exports ("re-export the adapter", naming a staging folder already gone) or an ONNX Runtime traceback."""
    from edgepeft.errors import ConfigError
    from toy_bias.slots import ToyBiasSlots

    model = edgepeft.get_peft_model(load_reference_base(tiny_base("llama"), "causal-lm"),
                                    toy_bias.ToyBiasConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "bias")
    values, install = ToyBiasSlots.values, ToyBiasSlots.install
    for hook, bad, said in (
            ("values", lambda self, *a: {k: v[:-1] for k, v in values(self, *a).items()},
             r"ToyBiasSlots.values gives 'toybias_bias.model.layers.0.mlp.down_proj' the shape \[31\], where its slot is "
             r"\[32\]"),
            ("values", lambda self, *a: {}, "ToyBiasSlots.values gives 'bias' no value for any of its slots"),
            ("install", lambda self, *a: (install(self, *a)[0], {}),
             "ToyBiasSlots.install gives no value for 'toybias_bias.model.layers.0.mlp.down_proj'")):
        with monkeypatch.context() as m:
            m.setattr(ToyBiasSlots, hook, bad)
            with pytest.raises(ConfigError, match=f"^{said}.*; mend the method's {hook} \\(docs/adding-a-method.md\\)$"):
                export([str(tmp_path / "bias")], str(tmp_path / "out"))
        assert not os.path.exists(tmp_path / "out")
