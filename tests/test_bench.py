"""edgepeft bench: latency per adapter, switch cost, staging and memory, measured on the runtime."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from file_checks import edit_json
from training_helpers import REPO

from edgepeft.cli import cli
from edgepeft.errors import ConfigError, UnknownAdapterError
from edgepeft.runtimes import Runtime
from edgepeft.runtimes.bench import measure, table


def test_measure_reports_every_adapter_and_generation(shared_export):
    out, dirs, _ = shared_export("llama")
    rt = Runtime(out)
    result = measure(rt, rounds=2, calls=2, seq=8, new_tokens=4)
    assert set(result["adapters"]) == set(dirs)
    for name, a in result["adapters"].items():
        assert a["methods"][0] == "lora"
        for key in ("stay_ms", "switching_ms", "load_ms", "switching_over_stay", "over_base"):
            assert a[key] > 0 and math.isfinite(a[key]), (name, key)
        assert a["staged_bytes"] == rt.store.get(name).bytes  # what adapter_budget_bytes counts
    # not the file's parameters (it said so): a fused q/k/v group's B is staged block-diagonal, 3x its parts
    assert result["adapters"]["all"]["staged_bytes"] > rt.adapter_info("all")["parameter_bytes"]
    small = Runtime(out, adapter_budget_bytes=0)  # nothing stays staged: the bytes are still counted (they were 0)
    assert {n: a["staged_bytes"] for n, a in measure(small, rounds=1, calls=1, seq=8)["adapters"].items()} == \
        {n: a["staged_bytes"] for n, a in result["adapters"].items()}
    assert set(result["tokens_per_s"]) == {"none", *dirs}
    assert rt.adapter_names == sorted(dirs)  # the staging probe loaded and unloaded its copies
    text = table(result)
    assert all(name in text for name in dirs) and "tokens/s" in text


def test_generation_speed_counts_the_tokens_made_for_the_whole_batch(shared_export, monkeypatch):
    """A model whose generation_config.json sets stop strings stopped each run after a token or so, and bench still
    divided the tokens asked for (17x too fast); --batch was ignored for tokens/s; a name given twice was switched
    to from itself half the time."""
    out, dirs, _ = shared_export("llama")
    rt = Runtime(out)
    name = sorted(dirs)[0]
    rt.manifest["generation"] = {"stop": ["w"]}
    made, real = [], rt.generate

    def recorded(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append(out.shape)
        return out

    monkeypatch.setattr(rt, "generate", recorded)
    result = measure(rt, [name, name], batch=2, rounds=3, calls=1, seq=8, new_tokens=4)
    assert set(made) == {(2, 12)}  # every run made its 4 tokens for both rows
    assert list(result["adapters"]) == [name] and set(result["tokens_per_s"]) == {"none", name}
    # one name as a string (it was read letter by letter), numpy sizes (refused as not whole)
    result = measure(rt, name, batch=np.int64(1), rounds=np.int64(1), calls=1, seq=8, new_tokens=np.uint8(2))
    assert list(result["adapters"]) == [name]


def test_staging_is_timed_under_a_name_the_export_does_not_hold(shared_export):
    """An adapter named qv__bench beside qv: measure failed after minutes of measuring ('already loaded; unload it
    first or pick another name', neither of which the user chose)."""
    rt = Runtime(shared_export("llama")[0])
    rt.load_adapter(rt.adapter_dir("qv"), name="qv__bench")
    names = rt.adapter_names
    assert set(measure(rt, ["qv"], rounds=1, calls=1, seq=4)["adapters"]) == {"qv"}
    assert rt.adapter_names == names


def test_measure_rejects_bad_arguments(shared_export):
    """In the bench command's own terms (--adapter, --seq, --new-tokens), before any measuring."""
    from edgepeft.errors import InvalidInputError

    rt = Runtime(shared_export("bert")[0])
    with pytest.raises(UnknownAdapterError, match="--adapter none: .* holds no adapter 'none' .*; give one of those, "
                       "or none for the base model alone$"):  # it said "the base model is measured anyway": nothing was
        measure(rt, ["none"], rounds=1, calls=1)  # the command line's word for the base; edgepeft bench maps it
    with pytest.raises(InvalidInputError, match=r"exceeds .*\(here: lower --seq\)"):
        measure(rt, seq=rt.max_positions + 1, rounds=1, calls=1)
    with pytest.raises(InvalidInputError, match=r"exceeds .*\(here: lower --seq\)"):  # numpy's "Maximum allowed ..."
        measure(rt, seq=10**30, rounds=1, calls=1)
    with pytest.raises(ConfigError, match=r"--batch 10{30} x --seq 4: the token ids alone do not fit in memory here"):
        measure(rt, batch=10**30, seq=4, rounds=1, calls=1)
    decoder = Runtime(shared_export("llama")[0])
    with pytest.raises(InvalidInputError, match="--new-tokens 60 .* lower --new-tokens"):
        measure(decoder, [], seq=8, rounds=1, calls=1, new_tokens=60)
    with pytest.raises(ConfigError, match="--rounds"):
        measure(rt, rounds=0)
    with pytest.raises(ConfigError, match="causal-LM"):
        measure(rt, rounds=1, calls=1, new_tokens=4)
    with pytest.raises(ConfigError, match="--new-tokens"):
        measure(rt, rounds=1, calls=1, new_tokens=-1)
    for bad in (dict(seed=-1), dict(seed=1.5), dict(adapters=5), dict(adapters=[{"qv": 0.5}])):  # numpy's TypeErrors
        with pytest.raises(ConfigError, match=f"{next(iter(bad))} must be"):
            measure(rt, rounds=1, calls=1, **bad)


def test_cli_bench_prints_table_and_writes_json_and_plot(shared_export, tmp_path):
    out, dirs, _ = shared_export("bert")
    name = sorted(dirs)[0]
    result = CliRunner().invoke(cli, ["bench", out, "--adapter", name, "--rounds", "2", "--calls", "2", "--seq", "8",
                                      "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    assert "| none (base model) |" in result.output and f"| {name} (lora) |" in result.output
    measured = data = json.loads((tmp_path / "b.json").read_text())
    assert list(data["adapters"]) == [name] and data["setup"]["seq"] == 8
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    with CliRunner().isolated_filesystem(temp_dir=tmp_path) as here:  # `--json -`: stdout (a file named '-' was written)
        base_only = CliRunner().invoke(cli, ["bench", out, "--adapter", "none", "--rounds", "1", "--calls", "1", "--seq",
                                             "4", "--json", "-"])  # it measured every adapter
        assert base_only.exit_code == 0, base_only.output
        assert os.listdir(here) == [] and "| none (base model) |" in base_only.stderr
    data = json.loads(base_only.stdout)
    # a hunt: a key cli.md lists was left out without an adapter (a KeyError for scripts); the same keys either way
    assert data["adapters"] == {} and set(data) == set(measured)


def test_bench_threads_sample_measures_every_setting(shared_export):
    """samples/bench_threads.py (the thread-pool figures in the README) runs on any decoder export."""
    rows = _run_sample("bench_threads.py", "--export", shared_export("llama")[0], "--rounds", 1)
    assert [r[0] for r in rows[1:]] == ["no spin", "spin", "spin, stop"]
    assert all(float(v) > 0 for r in rows[1:] for v in r[1:])


def _sample(name: str, *args):
    """Run samples/<name>; the finished process."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", name)
    return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=300)


def _run_sample(name: str, *args) -> list:
    """Run samples/<name> and return its markdown table's rows (header first) as lists of cells."""
    done = _sample(name, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line]


def test_bench_prefill_sample_times_both_ways(shared_export):
    """samples/bench_prefill.py (README, Measured: prefill) on a tiny decoder export."""
    rows = _run_sample("bench_prefill.py", "--export", shared_export("llama")[0], "--lengths", "4,9", "--rounds", 1)
    assert [r[0] for r in rows[1:]] == ["4", "9"]
    for r in rows[1:]:
        assert float(r[1]) > 0 and float(r[2]) > 0
        every, last = (float(x) for x in r[4].split(" / "))
        assert last > 0 and every == pytest.approx(last * int(r[0]), rel=0.01)  # every position vs the last only


def test_bench_lora_kernels_sample_computes_every_layout_alike(tmp_path):
    """samples/bench_lora_kernels.py (benchmarks.md, issue 18's levers): every variant computes the same deltas as
    edgepeft's layout, float32 ones exactly, quantized ones within their precision."""
    rows = _run_sample("bench_lora_kernels.py", "--blocks", 1, "--out", tmp_path)
    errors = {r[0]: float(r[4]) for r in rows[1:]}
    assert list(errors) == ["fp32 inputs (edgepeft)", "fp32 inputs, no row Mul", "fp32 inputs, B per member",
                            "fp32 constants", "fp16 inputs + Cast", "int8 inputs", "int4 inputs", "int4 constants"]
    assert all(float(r[2]) > 0 for r in rows[1:])
    assert max(errors[k] for k in list(errors)[:4]) <= 1e-6
    assert errors["fp16 inputs + Cast"] <= 1e-3 and errors["int8 inputs"] <= 0.02
    assert 0 < errors["int4 inputs"] == errors["int4 constants"] <= 0.1
    assert (tmp_path / "bench.md").is_file()


def test_bench_lora_layouts_sample_edits_the_real_graph_without_changing_logits(shared_export, tiny_base, tmp_path):
    """samples/bench_lora_layouts.py (benchmarks.md, issue 18's levers inside a step): on a tiny Llama export
    with an all-linear adapter, every edited layout gives edgepeft's logits; the adapter changes them."""
    rows = _run_sample("bench_lora_layouts.py", "--export", shared_export("llama")[0], "--adapter", "all",
                       "--rounds", 1, "--out", tmp_path)
    assert (tmp_path / "bench.md").read_text().count("| B per member") == 2
    diffs = {r[0]: float(r[4]) for r in rows[1:]}
    assert list(diffs) == ["edgepeft", "B per member", "no row Mul", "B per member, no row Mul", "no adapter"]
    assert max(diffs[k] for k in list(diffs)[:4]) <= 1e-5
    assert diffs["no adapter"] > 1e-3
    assert all(float(r[1]) > 0 for r in rows[1:])
    nodes = {r[0]: int(r[5]) for r in rows[1:]}  # the edits happened: ops added per fused group, one less per LoRA delta
    assert nodes["B per member"] > nodes["edgepeft"] > nodes["no row Mul"]
    from peft_refs import ia3_adapter

    from edgepeft.exporters import export  # an export of no LoRA adapter (IA3 alone): a StopIteration traceback

    ia3 = str(tmp_path / "ia3")
    export([ia3_adapter(tmp_path / "ia3-hf", tiny_base("llama"), seed=82)], ia3, names=["ia3"])
    done = _sample("bench_lora_layouts.py", "--export", ia3, "--adapter", "ia3", "--rounds", 1, "--out", tmp_path / "b")
    assert done.returncode == 1 and done.stderr.strip() == (f"error: {ia3}: this export has no LoRA slots (its adapters "
                                                            "use no LoRA); give an export of a LoRA adapter")


@pytest.mark.parametrize("args, refusal", [
    (["--calls", "3"], "--calls must be more than 3"),
    ([], "--out must lie inside"),
])
def test_bench_web_sample_refuses_before_it_empties_out(tmp_path, args, refusal):
    """samples/bench_web.py emptied --out, then said it must lie inside the repository (the folder was gone)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    done = _sample("bench_web.py", "--out", out, *args)
    assert done.returncode != 0 and refusal in done.stderr, done.stderr[-2000:]
    assert (out / "keep.txt").read_text() == "the user's"


def test_the_samples_say_an_error_or_a_count_they_refuse_in_a_line(shared_export, tmp_path):
    """The bench samples' errors were tracebacks (a missing export, a classifier export advised "re-export it", a
    prompt past the positions from ONNX Runtime), and --rounds 0 a StatisticsError after the work;
    train_generative.py emptied a --model inside its --out before failing to load it."""
    os.makedirs(tmp_path / "gen" / "model")
    short = shutil.copytree(shared_export("llama")[0], tmp_path / "short")  # bench_threads' step is at position 40
    edit_json(short / "base" / "edgepeft.json", max_positions=32)
    for args, code, said in (
            (["bench_threads.py", "--export", tmp_path / "none"], 1, f"error: {tmp_path / 'none'}: no such folder"),
            (["quantized_accuracy.py", "--qtol", "0", "--work", tmp_path / "q"], 1, "error: --qtol must be a number > 0"),
            (["bench_genai.py", "--help"], 1, "error: bench_genai.py needs onnxruntime-genai; run it with "
                                             ".venv-device/bin/python"),  # .venv has none: a ModuleNotFoundError
            (["bench_web.py", "--out", os.path.join(REPO, "bench-out", "web#1")], 1,  # the page fetched another path
             "holds #, which the page's URLs read otherwise; give another folder"),
            (["bench_threads.py", "--export", short, "--rounds", "1"], 1, f"error: {short}: the model has 32 "
             "positions, and this benchmark's step comes after 40 cached ones; export a model with more than 40"),
            (["bench_prefill.py", "--export", tmp_path / "none"], 1, f"error: {tmp_path / 'none'}: no such folder"),
            (["bench_prefill.py", "--export", shared_export("bert")[0]], 1, "a feature-extraction export; give a causal"),
            (["bench_prefill.py", "--export", shared_export("llama")[0], "--lengths", "9999"], 1,
             "error: --lengths 9999: the model has 64 positions"),
            (["bench_prefill.py", "--rounds", "0"], 2, "argument --rounds: 0 is not a whole number from 1"),
            (["bench_lora_kernels.py", "--blocks", "-1"], 2, "argument --blocks: -1 is not a whole number from 1"),
            (["train_generative.py", "--model", tmp_path / "gen" / "model", "--out", tmp_path / "gen"], 1,
             "lies inside --out"),
            (["training_defaults.py", "--work", ""], 2, "--work '': an empty path; give --work a folder"),
            (["training_defaults.py", "--tasks", "causal-lm", "--data", "sentiment"], 2,
             "--data sentiment: no data set of --tasks causal-lm is named so"),
            (["web/serve.py", "--host", "no-such-host.invalid", "--port", "0"], 1, "; pass another --host"),
            (["bench_ops.py", "--new-tokens", "0"], 2, "argument --new-tokens: 0 is not a whole number from 1"),
            (["bench_generate.py", "--new-tokens", "600"], 2, "--new-tokens 600: the benchmark model's 512 positions "
                                                             "leave room for 497 after its 16-token prompt; pass at most 497")):
        done = _sample(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == code and said in lines[-1] and "Traceback" not in done.stderr, (args, done.stderr)
    assert (tmp_path / "gen" / "model").is_dir()


def test_a_batch_that_does_not_fit_in_memory_is_refused_in_a_line(shared_export):
    """Activations no memory holds (ids that fit, 200,000 rows) were ONNX Runtime's allocation failure in a
    traceback; the process's memory is capped so that the arena refuses, as on a small device."""
    import resource
    import subprocess
    import sys

    cap = 3 * 2**30
    done = subprocess.run([sys.executable, "-m", "edgepeft", "bench", shared_export("llama")[0], "--batch", "200000",
                           "--seq", "64", "--rounds", "1", "--calls", "1"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    [last] = done.stderr.strip().splitlines()  # ONNX Runtime's own log of the failure is not printed above it
    assert done.returncode == 1, done.stderr
    assert "a batch of 200000 row(s) x 64 positions does not fit in memory here (Failed to allocate memory" in last
    assert last.endswith("use a smaller batch or shorter inputs (here: lower --batch or --seq)")
    script = ("import resource, sys, numpy as np; resource.setrlimit(resource.RLIMIT_AS, (5 * 2**29, 5 * 2**29)); "
              "from edgepeft.runtimes import Runtime, OutOfMemoryError\ntry:\n    Runtime(sys.argv[1], load_adapters="
              "False).generate(np.full((100000, 1), 5), max_new_tokens=2, eos_token_id=[])\nexcept OutOfMemoryError as e:"
              "\n    print(e)")  # the prefill fits, the decode steps' fixed cache (numpy's MemoryError) does not
    done = subprocess.run([sys.executable, "-c", script, shared_export("llama")[0]], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert "the cache of 100000 row(s) x " in done.stdout and "use a smaller batch" in done.stdout, done.stderr[-800:]


def test_measure_keeps_no_calls_outputs(shared_export, monkeypatch):
    """Found by a hunt: each timed call's logits were kept, so memory grew by rounds x calls x logits per peer (1.7 GiB
    for 3 adapters of a 32,000-word vocabulary at the defaults) and the resident memory printed counted them."""
    from edgepeft.runtimes import bench

    kept, real = [], bench.interleaved
    monkeypatch.setattr(bench, "interleaved", lambda *a, **k: kept.append(real(*a, **k)) or kept[-1])
    out, dirs, _ = shared_export("llama")
    measure(Runtime(out), rounds=2, calls=2, seq=8)
    assert {ran for peer, calls in kept[0].items() if peer != "switching" for _, ran in calls} == {None}


def test_bench_and_inspect_on_what_a_hunt_found(shared_export, tmp_path, monkeypatch):
    """Found by a hunt: bench said an adapter a stopped export moved aside was not in OUT ("give one of those"), and
    left it out unsaid; the --json's switch_cost was a ratio where the table's switch cost is ms; its setup lacked
    --new-tokens and --shared-threads; 512 staged bytes read "0 KiB"; a --merge export's chart called its base "no
    adapter"; inspect was a traceback on a non-object peft_config or a non-string source, and on a base/ without its
    manifest named an export into OUT, which refuses such a folder."""
    import re
    import shutil
    import subprocess
    import sys

    from edgepeft import plots
    from edgepeft.errors import CorruptArtifactError, EdgePeftWarning
    from edgepeft.runtimes.access import this_host

    out = str(tmp_path / "out")
    shutil.copytree(shared_export("llama")[0], out)
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    aside = os.path.join(out, "adapters", f".old-qv-p{gone.pid}h{this_host()}-abc")
    os.replace(os.path.join(out, "adapters", "qv"), aside)
    stopped = f"by an export into {out} that was stopped; run that export again (it puts the folder back first)"
    rt = Runtime(out)
    with pytest.raises(UnknownAdapterError, match=re.escape(f"--adapter qv: moved aside to {aside} {stopped}")):
        measure(rt, ["qv"], rounds=1, calls=1, seq=4)
    with pytest.warns(EdgePeftWarning, match=re.escape(f"{aside}: adapter 'qv' not measured: moved aside {stopped}")):
        result = measure(rt, rounds=1, calls=1, seq=4)
    assert "qv" not in result["adapters"] and result["setup"]["new_tokens"] == 0
    assert result["setup"]["shared_threads"] is False and "switch_cost" not in result["adapters"]["all"]
    a = result["adapters"]["all"]
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "cli.md")) as f:
        named = f.read().split("and per adapter", 1)[1].split("; with `--new-tokens`", 1)[0]
    assert set(a) == set(re.findall(r"`(\w+)`", named))  # an entry's keys are those docs/cli.md names, no others
    a["staged_bytes"] = 512
    assert "/ 512 B |" in table(result)  # it said "0 KiB"

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.bench_chart({**result, "adapters": {}, "merged_adapter": "qv"}, str(tmp_path / "c.png"))
    assert [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()] == ["qv (merged into the base)"]

    for file, key, value in (("adapters/all/adapter.json", "peft_config", "oops"), ("base/edgepeft.json", "source", 5)):
        path = os.path.join(out, file)
        with open(path) as f:
            kept = f.read()
        with open(path, "w") as f:
            json.dump({**json.loads(kept), key: value}, f)
        said = CliRunner().invoke(cli, ["inspect", out])
        assert isinstance(said.exception, CorruptArtifactError) and f"field {key!r} must be" in str(said.exception)
        with open(path, "w") as f:
            f.write(kept)
    os.remove(os.path.join(out, "base", "edgepeft.json"))
    said = CliRunner().invoke(cli, ["inspect", out])
    assert str(said.exception) == (f"{os.path.join(out, 'base', 'edgepeft.json')}: missing, beside other files (an "
                                   "export's base whose manifest was removed, or not an export); copy the export's "
                                   "base folder again, or re-run `edgepeft export` into a fresh --out folder")


def test_samples_refuse_counts_they_cannot_measure_with_before_any_work(tmp_path):
    """Found by a hunt: bench_lora.py --rounds 1 --calls 1 (a KeyError: the switching peers never reached their second
    adapter), bench_lora.py --seq 600 (torch's traceback) and bench_generate.py --warmup 0 (a KeyError after the
    builds) failed at the end; train_generative.py and pairs_accuracy.py --epochs 0 emptied the last run's folder
    first."""
    for script, flag in (("train_generative.py", "--out"), ("pairs_accuracy.py", "--work")):
        (tmp_path / script).mkdir()
        (tmp_path / script / ".edgepeft-sample").write_text(script)
        (tmp_path / script / "results.json").write_text("{}")
        done = _sample(script, flag, tmp_path / script, "--epochs", 0)
        assert done.returncode == 2 and "argument --epochs: 0 is not a whole number from 1" in done.stderr
        assert (tmp_path / script / "results.json").exists()
    lora = _sample("bench_lora.py", "--rounds", 1, "--calls", 1)
    assert lora.returncode == 2 and lora.stderr.strip().endswith("error: --rounds x --calls must be at least 2: a "
                                                                 "switching peer's calls alternate two adapters")
    seq = _sample("bench_lora.py", "--seq", 600)  # torch's traceback after the exports
    assert seq.returncode == 2 and seq.stderr.strip().endswith("error: --seq 600: MiniLM has room for 496 tokens beside "
                                                               "the prompt adapter's 16")
    warmup = _sample("bench_lora.py", "--warmup", -1)
    assert warmup.returncode == 2 and warmup.stderr.strip().endswith("error: --warmup -1: give 0 or more untimed calls")
    generate = _sample("bench_generate.py", "--warmup", 0)
    assert generate.returncode == 2 and "argument --warmup: 0 is not a whole number from 1" in generate.stderr


def test_benchmark_samples_refuse_a_folder_of_ones_own_files(tmp_path):
    """Found by a hunt: bench_lora_kernels.py, bench_ops.py and bench_lora_layouts.py wrote their bench.md over any
    --out, a user's own file of that name too (bench_genai_builder.py, in its own environment, alike)."""
    (tmp_path / "bench.md").write_text("# mine\n")
    for script in ("bench_lora_kernels.py", "bench_ops.py", "bench_lora_layouts.py"):
        done = _sample(script, "--out", tmp_path, *(("--export", tmp_path) if script == "bench_lora_layouts.py" else ()))
        assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path}: holds files no sample wrote, and a " \
            "run writes over its folder; give another folder (or remove this one)", (script, done.stderr)
    assert (tmp_path / "bench.md").read_text() == "# mine\n"


def test_the_sample_pages_server_stops_on_ctrl_c_in_one_line():
    """Found by a hunt: `make web`'s server, stopped the only way it stops (Ctrl-C), printed a traceback, and so did a
    --port past 65535."""
    import signal
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "web", "serve.py")
    bad = subprocess.run([sys.executable, script, "--port", "99999"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "argument --port: '99999' is not a port number (0 to 65535)" in bad.stderr
    server = subprocess.Popen([sys.executable, script, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a
    # terminal's foreground job: a suite run in the background (`make test &`) passes SIGINT on ignored, and Python
    # then leaves it ignored
    assert "Ctrl-C stops it" in server.stdout.readline()  # listening
    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 130 and err == "stopped\n"


def test_the_training_defaults_sweep_stops_at_ctrl_c(monkeypatch):
    """Found by a hunt: samples/training_defaults.py recorded a Ctrl-C as the run's "error" row, went on to the next
    method and exited 0."""
    import edgepeft
    from edgepeft.errors import TrainingInterrupted

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples"))
    import training_defaults

    def interrupted(**kwargs):
        raise TrainingInterrupted("interrupted in the first epoch; nothing was saved in out")

    monkeypatch.setattr(edgepeft, "train", interrupted)
    with pytest.raises(TrainingInterrupted):
        training_defaults.run("lora", "seq-cls", ("m", "d", "e"), 1e-3, 1e-2, {}, "out")
    monkeypatch.setattr(edgepeft, "train", lambda **kwargs: 1 / 0)  # a failed run is still a row
    assert training_defaults.run("lora", "seq-cls", ("m", "d", "e"), 1e-3, 1e-2, {}, "out")["error"].startswith(
        "ZeroDivisionError")


def test_bench_web_names_a_missing_chromium_before_any_work():
    """Found by a hunt: without Chromium the page's peer failed at the end, a JSONDecodeError traceback."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "samples", "bench_web.py")
    done = subprocess.run([sys.executable, script, "--out", "bench-out/never-made"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "CHROMIUM": "/nonexistent/chromium"})
    assert done.returncode == 1 and done.stderr.strip() == "error: /nonexistent/chromium: missing; install Chromium " \
        "(make test does: apt-get install chromium), or set CHROMIUM to its path"


def test_the_first_call_of_each_turn_which_follows_another_peers_call_is_not_timed(shared_export, monkeypatch):
    """Found by a hunt: each peer's turn began with a call that followed another peer's (a switch), timed as the
    peer's own: --calls 1 read the base 1.5x and the switch cost halved, "within noise". Each timed call here says
    whether it followed another peer's call; none of measure's forward calls' turns time that first one."""
    from edgepeft.runtimes import bench

    last = {"peer": None}

    def peer(name):
        def call():
            followed, last["peer"] = last["peer"] not in (None, name), name
            return followed
        return call

    for calls, settle in ((1, 1), (2, 1), (10, 1), (1, 0)):
        last["peer"] = None
        timed = bench.interleaved({n: peer(n) for n in "abc"}, rounds=6, calls=calls, warmup=0, settle=settle)
        assert any(followed for runs in timed.values() for _, followed in runs) == (settle == 0), (calls, settle)
    real, settles = bench.interleaved, []
    monkeypatch.setattr(bench, "interleaved", lambda *a, **k: settles.append(k.get("settle", 0)) or real(*a, **k))
    bench.measure(Runtime(shared_export("llama")[0]), rounds=1, calls=1, adapters=["qv"])
    assert settles == [1]  # the forward calls' turns (no --new-tokens: no generation turns)
