"""What the sample scripts share: the folder a run writes, emptied only where a sample made it, counts checked as
they are parsed, and errors and Ctrl-C said in one line, as the `edgepeft` commands say them."""
import argparse
import os
import shutil
import sys

from edgepeft.errors import EdgePeftError, TrainingInterrupted

MARK = ".edgepeft-sample"  # in a folder a sample made: the next run may empty it
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the samples' default folders lie


def claim_folder(path: str, default: str, emptied: bool = False) -> str:
    """``path`` marked as this sample's folder and kept as it is: a missing or empty folder, one this sample made
    (``emptied``: the run empties it; a mark of no name is an earlier edgepeft's), or the
    repository's own ``default`` (ignored by git; samples before the mark wrote it); a folder of anything else (an
    adapter of one's own, `--out .`, a ``default`` of that name in another working folder) is refused."""
    if not path:
        sys.exit("error: '': an empty path; give a folder for the run's files")
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        sys.exit(f"error: {path}: is a file or a link; give a folder for the run's files")
    me, mark = os.path.basename(sys.argv[0]), os.path.join(path, MARK)
    try:
        with open(mark) as f:
            made_by = f.read().strip()
    except OSError:
        made_by = None
    if made_by and made_by != me:  # bench_many.py --out bench-out emptied every benchmark's results; bench_ops into
        # bench_lora_layouts' folder replaced its bench.md, bench_lora into bench_generate's removed its merged/ export
        sys.exit(f"error: {path}: holds {made_by}'s files, which a run of {me} would "
                 f"{'remove' if emptied else 'write over'}; give another folder")
    own = made_by is not None or os.path.abspath(path) == os.path.join(REPO, default)
    if os.path.isdir(path) and os.listdir(path) and not own:
        sys.exit(f"error: {path}: holds files no sample wrote, and a run writes over its folder; give another folder "
                 "(or remove this one)")
    try:
        os.makedirs(path, exist_ok=True)
        if not made_by:
            with open(mark, "w") as f:
                f.write(me)
    except OSError as e:
        sys.exit(f"error: {path}: {e.strerror}; give a folder for the run's files")
    return path


def fresh_folder(path: str, default: str) -> str:
    """``claim_folder``, then emptied for the run (its mark kept)."""
    for name in os.listdir(claim_folder(path, default, emptied=True)):
        if name != MARK:
            entry = os.path.join(path, name)
            shutil.rmtree(entry) if os.path.isdir(entry) and not os.path.islink(entry) else os.unlink(entry)
    return path


def genai(environment: str):
    """``onnxruntime_genai``, or one line naming the ``environment`` (a Makefile's) that has it: .venv has none
    (genai brings the CPU onnxruntime, which never shares one with onnxruntime-gpu), and even --help was a
    ModuleNotFoundError traceback there."""
    try:
        import onnxruntime_genai
    except ImportError:
        sys.exit(f"error: {os.path.basename(sys.argv[0])} needs onnxruntime-genai; run it with {environment}/bin/python "
                 f"(make {environment}/.edgepeft-installed makes it)")
    return onnxruntime_genai


def positive(text: str) -> int:
    """An argparse type: a whole number from 1 (a count of rounds or calls; 0 left nothing to take the median of)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number from 1")
    return value


def run(main) -> None:
    """``main()``, an EdgePeftError or a refused file as one `error:` line (exit 1) and Ctrl-C as `interrupted` (exit
    130): a traceback and a resume command for a folder the next run empties, before."""
    try:
        main()
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"interrupted; run {os.path.basename(sys.argv[0])} again to start over", file=sys.stderr)
        sys.exit(130)
    except EdgePeftError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # the disk said no: a path that is a file, no permission, disk full
        sys.exit(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}; check the path")
