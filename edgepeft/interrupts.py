"""Ctrl-C (SIGINT) held off while files that belong together are written or renamed, then answered as the process
answers it: exports' commits, training's checkpoints, staged folders put in place or removed."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


@contextmanager
def held_interrupts():
    """Ctrl-C (SIGINT) waits until the block is done; yields the list of those that came, for the caller to answer.
    Outside the main thread (where no signal handler can be set) the block runs as it is."""
    caught = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def written_whole(what: str):
    """Ctrl-C held off while the block writes ``what``; one that came is raised once it is done, saying so (the CLI
    prints that line: "aborted" read as if nothing, or half, was written). Where the process answers SIGINT its own
    way (ignored: a background job; an app's handler), that answer is given instead, as ``deferred_interrupts``."""
    with held_interrupts() as caught:
        yield
    if caught and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        stop = "a SIGTERM" if TERMINATED else "Ctrl-C"  # answered as Ctrl-C, but not the user's key
        raise KeyboardInterrupt(f"interrupted once {what} was written whole ({stop} waits for that)")
    if caught:
        signal.raise_signal(signal.SIGINT)


@contextmanager
def deferred_interrupts():
    """Ctrl-C (SIGINT) waits until the block is done: renames that belong together all happen, then it is raised."""
    with held_interrupts() as caught:
        yield
    if caught:
        signal.raise_signal(signal.SIGINT)  # to the handler held off (Python's: KeyboardInterrupt)


TERMINATED = []  # the SIGTERMs answered as Ctrl-C: the command exits 143 (128 + 15), as a process SIGTERM ended
STOPPING = []  # set by a command that is stopping (``stopping``): under torchrun its agent's SIGTERM is passed over


def stopping() -> None:
    """This command is stopping (training's Ctrl-C, another process's end, its own error) and says why: under
    torchrun the agent's SIGTERM that follows is passed over, where answered as Ctrl-C it cut that line."""
    STOPPING.append(True)


@contextmanager
def terminated_as_interrupts():
    """While a command runs, SIGTERM (``kill``, ``timeout``, ``docker stop``, a scheduler's preemption) is answered as
    Ctrl-C: an export removes what it staged (int8's temp copy of the base too), a commit or a checkpoint finishes
    first, training prints its --resume command. It ended the process where it stood. Only where Ctrl-C raises
    KeyboardInterrupt in the main thread. Under torchrun, SIGTERM is its agent's stop of every worker (another one
    ended: a hunt found the first printing nothing where the agent stopped it before gloo said so; torchrun itself
    stopped): answered once, and not in a process already stopping (Ctrl-C, another's end), whose line it would cut."""
    TERMINATED.clear()  # an earlier command's, in this process (main called again)
    STOPPING.clear()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):  # a background job's: ignored
        yield
        return
    torchrun = under_torchrun()

    def as_ctrl_c(signum, frame):
        if torchrun and (TERMINATED or STOPPING):  # stopping already (Ctrl-C, gloo's word of another's end): its
            return  # line is on its way (a review: any except block a library ran passed it over, a line was cut)
        TERMINATED.append(signum)
        answer = signal.getsignal(signal.SIGINT)  # held off in a commit (held_interrupts) as Ctrl-C is
        (answer if callable(answer) else signal.default_int_handler)(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stopped_status() -> int:
    """The exit status of a command stopped by Ctrl-C (130) or by a SIGTERM answered as one (143)."""
    return 143 if TERMINATED else 130


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's workers (accelerate launch starts them through torchrun too)."""
    return "TORCHELASTIC_RUN_ID" in os.environ
