"""What exports stopped midway left in an export folder, mended at the next export into it: staging folders and
temporary files (``files.remove_abandoned``), and adapter manifests re-pointed to a new base that was renamed in
before them (``commit``)."""
from __future__ import annotations

import os

from edgepeft.errors import EdgePeftError
from edgepeft.files import remove_abandoned
from edgepeft.runtimes.access import REPOINTED, read_json
from edgepeft.runtimes.manifest import ADAPTER_MANIFEST, ADAPTERS_DIR, BASE_DIR, adapter_dirs, read_base_manifest


def abandoned(out: str) -> list[str]:
    """What exports stopped midway left in OUT, OUT/adapters and each adapter's folder (a re-pointed manifest's temp
    file, which stayed), mended (``remove_abandoned``): one line each."""
    done = remove_abandoned(out) + remove_abandoned(os.path.join(out, ADAPTERS_DIR))  # first: one moved aside is back
    return done + [line for folder in adapter_dirs(out).values() for line in remove_abandoned(folder)]


def finish_repointing(out: str) -> list[str]:
    """The re-pointed manifests (``commit``) an export killed between renaming the new base in and them left
    beside the adapters' own: renamed into place where they name the base OUT holds (it is the new one), else
    removed. One line per adapter, saying what was done."""
    try:
        holds = read_base_manifest(os.path.join(out, BASE_DIR))["fingerprint"]
    except EdgePeftError:
        holds = None
    done = []
    for d in adapter_dirs(out).values():
        staged = os.path.join(d, REPOINTED)
        if not os.path.isfile(staged):
            continue
        try:
            made_for = read_json(staged, "re-pointed adapter manifest", "")["base_fingerprint"]
        except (EdgePeftError, KeyError):
            made_for = None
        if holds is not None and made_for == holds:
            os.replace(staged, os.path.join(d, ADAPTER_MANIFEST))
            done.append(f"re-pointed {d} to the base OUT holds (an export was stopped before it had)")
        else:
            os.unlink(staged)
            done.append(f"removed {staged} (left by an export that was stopped midway)")
    return done
