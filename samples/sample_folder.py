"""What the sample scripts share: the folder a run writes, emptied only where a sample made it, and errors and
Ctrl-C said in one line, as the `edgepeft` commands say them."""
import os
import shutil
import sys

from edgepeft.errors import EdgePeftError, TrainingInterrupted

MARK = ".edgepeft-sample"  # in a folder a sample made: the next run may empty it


def fresh_folder(path: str, default: str) -> str:
    """``path`` made empty for a run: a missing or empty folder, one a sample made, or the sample's ``default`` (the
    repository's own ignored folder, which samples before the mark wrote); a folder of anything else (an adapter of
    one's own, `--out .`) is refused, not emptied."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        sys.exit(f"error: {path}: is a file or a link; give a folder for the run's files")
    own = os.path.exists(os.path.join(path, MARK)) or os.path.abspath(path) == os.path.abspath(default)
    if os.path.isdir(path) and os.listdir(path) and not own:
        sys.exit(f"error: {path}: holds files no sample wrote, and a run empties its folder; give another folder "
                 "(or remove this one)")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    open(os.path.join(path, MARK), "w").close()
    return path


def run(main) -> None:
    """``main()``, an EdgePeftError as one `error:` line (exit 1) and Ctrl-C as `interrupted` (exit 130): a
    traceback and a resume command for a folder the next run empties, before."""
    try:
        main()
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"interrupted; run {os.path.basename(sys.argv[0])} again to start over", file=sys.stderr)
        sys.exit(130)
    except EdgePeftError as e:
        sys.exit(f"error: {e}")
