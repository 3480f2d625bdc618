"""The runtime stands alone: it imports no torch, transformers or onnx."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tiny import sample_batch


def test_runtime_runs_with_torch_transformers_and_onnx_blocked(shared_export):
    out, dirs, _ = shared_export("llama")
    ids, mask = sample_batch()
    script = textwrap.dedent(
        f"""
        import sys, json
        import numpy as np

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "onnx", "optimum", "peft"):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from edgepeft.runtimes import Runtime
        from edgepeft.runtimes.bench import measure
        rt = Runtime({out!r})
        measure(rt, rounds=1, calls=1, seq=4)
        ids = np.array({ids.tolist()}); mask = np.array({mask.tolist()})
        logits = rt.forward(ids, mask, adapter={sorted(dirs)[0]!r})["logits"]
        loaded = sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
        print(json.dumps({{"shape": list(logits.shape), "adapters": rt.adapter_names, "loaded": loaded}}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"shape": [2, 9, 128], "adapters": sorted(dirs), "loaded": []}


def test_without_onnx_runtime_the_runtime_names_the_extras_in_one_line(shared_export):
    """An install without the [cpu] or [gpu] extra: errors and manifests work; Runtime says what to install."""
    out, _, _ = shared_export("llama")
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "onnxruntime":
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import edgepeft.runtimes
        from edgepeft.errors import EdgePeftError, MissingDependencyError
        from edgepeft.runtimes.describe import describe_export
        assert describe_export({out!r})["adapters"]
        try:
            edgepeft.runtimes.Runtime
        except MissingDependencyError as e:
            assert isinstance(e, EdgePeftError) and isinstance(e, ImportError)
            print(e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "edgepeft's runtime needs ONNX Runtime: pip install 'edgepeft[cpu]' (or 'edgepeft[gpu]' for NVIDIA GPUs)"]


def test_a_second_shared_pool_call_repeats_the_first_or_is_refused(shared_export):
    """ONNX Runtime makes the process's shared pool once: a repeat of the same size is a no-op (a library and its
    app may both call it), another size a ConfigError, not ONNX Runtime's raw failure."""
    out, dirs, _ = shared_export("llama")
    script = textwrap.dedent(
        f"""
        import numpy as np
        import onnxruntime as ort
        from edgepeft.runtimes import ConfigError, Runtime, use_shared_thread_pool
        for bad in ("4", 2.5, -1, True, 2**31):  # ONNX Runtime's raw TypeError, or recorded as the pool's size
            try:
                use_shared_thread_pool(bad)
            except ConfigError as e:
                print(e)
        use_shared_thread_pool(2)
        use_shared_thread_pool(2)
        rt = Runtime({out!r})
        print(rt.forward(np.array([[5, 6, 7]]), adapter={sorted(dirs)[0]!r})["logits"].shape)
        try:
            use_shared_thread_pool(3)
        except ConfigError as e:
            print(e)
        try:  # options of the app's own that ask for a pool: ONNX Runtime's error blamed the export
            Runtime({out!r}, sess_options=ort.SessionOptions())
        except ConfigError as e:
            print(e)
        from edgepeft.runtimes import session_options
        try:  # found by a hunt: the 4 was dropped, the session ran on the shared pool
            session_options(4)
        except ConfigError as e:
            print(e)
        print(session_options().use_per_session_threads)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        *(f"use_shared_thread_pool: threads must be a whole number from 0 (ONNX Runtime's default: one per physical "
          f"core) below 2**31, got {bad}" for bad in ("'4'", "2.5", "-1", "True", "2147483648")),
        "(1, 3, 128)",
        "use_shared_thread_pool: this process's pool is already made, with threads=2 (asked: 3); call it once, at "
        "app start",
        "sess_options asks for a thread pool of its own, which ONNX Runtime refuses after use_shared_thread_pool(); "
        "set sess_options.use_per_session_threads = False, or start from edgepeft.runtimes.session_options()",
        "session_options: this process's sessions share one pool (use_shared_thread_pool(2)); a session cannot have 4 "
        "threads of its own: call session_options() without intra_op_threads",
        "False"]


def test_a_shared_pool_of_threads_0_is_onnx_runtimes_default(monkeypatch):
    """Found by a hunt: threads=0 made a pool of os.cpu_count() threads (logical CPUs, affinity ignored), where a
    session's own pool of 0 is ONNX Runtime's default (one per physical core); the docs said "one per core"."""
    from onnxruntime.capi import _pybind_state

    from edgepeft.runtimes import ConfigError, sessions

    made = []
    monkeypatch.setattr(_pybind_state, "set_global_thread_pool_sizes", lambda *sizes: made.append(sizes))
    monkeypatch.setattr(sessions, "_shared_pool", None)  # this process's real pool stays unmade
    sessions.use_shared_thread_pool()
    sessions.use_shared_thread_pool(0)  # a repeat
    assert made == [(0, 1)] and sessions.shared_pool()
    with pytest.raises(ConfigError, match=r"pool is already made, with threads=0 \(asked: 2\)"):
        sessions.use_shared_thread_pool(2)
    with pytest.raises(ConfigError, match=r"threads must be a whole number from 0 .* below 2\*\*31, got 2147483648"):
        sessions.session_options(2**31)  # pybind's TypeError


def test_providers_chosen_on_the_apps_sess_options_are_onnx_runtimes_to_use(shared_export):
    """Found by a hunt: ONNX Runtime 1.22+ takes the providers on SessionOptions (add_provider_for_devices, a
    selection policy or delegate); Runtime(OUT, sess_options=so) passed ["CPUExecutionProvider"] over them, and ONNX
    Runtime used that list (its warning named providers the app never passed)."""
    from edgepeft.runtimes import Runtime, session_options

    asked = []

    def pick(devices, model_metadata, runtime_metadata, most):  # ONNX Runtime's selection delegate
        asked.append([d.ep_name for d in devices])
        return [d for d in devices if d.ep_name == "CPUExecutionProvider"][:most]

    so = session_options()
    so.set_provider_selection_policy_delegate(pick)
    rt = Runtime(shared_export("llama")[0], sess_options=so, load_adapters=False)
    assert asked and rt.session.get_providers() == ["CPUExecutionProvider"] and rt.device == ("cpu", 0)


def test_an_onnx_runtime_older_than_the_exports_need_is_named_not_the_files(tmp_path, monkeypatch):
    """onnxruntime 1.20/1.21 (which [cpu] allowed) refuse the decoders' GroupQueryAttention: the message said the
    export was damaged and to re-export, which never helps; 1.22-1.23's int4 quantizer was a TypeError traceback."""
    import onnxruntime as ort
    import pytest

    from edgepeft.errors import CorruptArtifactError, MissingDependencyError
    from edgepeft.exporters.quantize import check_quantize
    from edgepeft.runtimes.sessions import open_base_session

    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"not a graph")
    with pytest.raises(CorruptArtifactError, match="re-run `edgepeft export`"):
        open_base_session(str(graph), ["CPUExecutionProvider"], None)
    check_quantize("int4")
    monkeypatch.setattr(ort, "__version__", "1.21.0")
    with pytest.raises(MissingDependencyError, match=r"edgepeft's export needs onnxruntime>=1.22, this is 1.21.0; "
                                                     r"pip install -U onnxruntime \(or onnxruntime-gpu\)$"):
        open_base_session(str(graph), ["CPUExecutionProvider"], None)
    monkeypatch.setattr(ort, "__version__", "1.23.2")
    with pytest.raises(MissingDependencyError, match=r"^--quantize int4 .* needs onnxruntime>=1.24, this is 1.23.2"):
        check_quantize("int4")


def test_export_without_onnx_runtime_names_the_extra_in_one_line(tmp_path):
    """`pip install 'edgepeft[train]'` alone: `edgepeft export` was a ModuleNotFoundError traceback."""
    script = textwrap.dedent(
        f"""
        import importlib.util
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "onnxruntime" else real(name, *a)
        from edgepeft.cli import main
        main(["export", "--adapter", {str(tmp_path)!r}, "--out", {str(tmp_path / "out")!r}])
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: `edgepeft export` checks the export on ONNX Runtime, which this install lacks; pip install "
        "'edgepeft[cpu]' (or 'edgepeft[gpu]')")


def test_the_training_api_on_a_runtime_only_install_names_the_extra(monkeypatch, tmp_path):
    """Found by a hunt: on a runtime-only install edgepeft.train, edgepeft.LoraConfig or `from edgepeft.exporters import
    export` were a ModuleNotFoundError from deep inside (one package, no extra), not the CLI's one line; a missing
    tokenizers or jinja2 was a ConfigError, which an app catching ImportError missed."""
    script = textwrap.dedent(
        """
        import importlib, sys
        sys.modules["safetensors"] = None  # not installed
        import edgepeft
        from edgepeft.errors import MissingDependencyError
        def said(get):
            try:
                get()
            except MissingDependencyError as e:
                print(e)
        said(lambda: edgepeft.get_peft_model)  # safetensors alone missing: named, with the extra
        for m in ("torch", "transformers", "onnx", "optimum", "accelerate"):
            sys.modules[m] = None
        for name in ("train", "export", "Trainer", "LoraConfig", "load_config"):
            said(lambda: getattr(edgepeft, name))
        for module in ("edgepeft.exporters", "edgepeft.training"):
            said(lambda: importlib.import_module(module))
        print(edgepeft.Runtime.__name__)  # the runtime needs none of them
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "edgepeft.get_peft_model needs safetensors, which this install lacks; pip install 'edgepeft[train,cpu]'"
    names = ["edgepeft.train", "edgepeft.export", "edgepeft.Trainer", "edgepeft.LoraConfig", "edgepeft.load_config",
             "edgepeft.exporters", "edgepeft.training"]
    assert lines[1:] == [f"{n} needs torch, transformers, onnx, optimum, accelerate, which this install lacks (it runs "
                         "exports only); pip install 'edgepeft[train,cpu]'" for n in names] + ["Runtime"]

    import pytest

    from edgepeft.errors import MissingDependencyError
    from edgepeft.runtimes import chat_template
    from edgepeft.runtimes.text import TextTokenizer

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(MissingDependencyError, match=r"^text helpers need the `tokenizers` package: pip install tokenizers$"):
        TextTokenizer(str(tmp_path))
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(MissingDependencyError, match=r"^chat templates need jinja2 3.1.6 or later .*which is not installed"):
        chat_template.compile_template("{{ messages }}", "tokenizer_config.json")


def test_a_runtime_pickled_names_the_fix(shared_export):
    """Found by a hunt: pickling a Runtime (what multiprocessing's spawn does with what it hands a process) was ONNX
    Runtime's TypeError, naming no fix."""
    import pickle

    import pytest

    from edgepeft.runtimes import ConfigError, Runtime

    rt = Runtime(shared_export("llama")[0])
    with pytest.raises(ConfigError, match=rf"^a Runtime cannot be pickled: .*; open one in each process, Runtime\('{rt.path}'\)$"):
        pickle.dumps(rt)
