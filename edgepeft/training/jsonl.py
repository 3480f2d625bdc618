"""A data file's bytes as JSON Lines: its lines (read once: a pipe too), and what a file that is not JSON Lines is."""
from __future__ import annotations

import codecs
import itertools
import json
import os
import shlex


def file_lines(path: str) -> list[bytes]:
    """The file's lines as bytes; a UTF-8 byte-order mark (Windows editors and Excel write one) is no text."""
    with open(path, "rb") as f:
        data = f.read()
    return data.removeprefix(codecs.BOM_UTF8).split(b"\n")


def not_json_lines(lines: list[bytes]) -> str | None:
    """What a file that is no JSON Lines is, where a line of it did not parse: one JSON document over many lines (a
    pretty-printed array), UTF-16 text, lines ended by CR alone; None otherwise."""
    data = b"\n".join(lines)  # as read (a pipe is read once)
    if b"\0" in data:  # UTF-16 without its byte-order mark (with one, the first line is not UTF-8)
        return "the file holds NUL bytes (UTF-16 text?): save it as UTF-8, one JSON object per line"
    if b"\r" in data and b"\n" not in data:
        return "its lines end in CR alone (old Mac line ends): save it with LF or CRLF line ends"
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    rows = "jq -c '.[]' file.json > file.jsonl" if isinstance(document, list) else "jq -c . file.json > file.jsonl"
    return (f"the file is one JSON document over several lines (a pretty-printed {type(document).__name__}), not JSON "
            f"Lines: write each row as one JSON object on its own line ({rows})")


def gzip_fix(path: str) -> str:
    """What unpacks the gzip-compressed data file ``path`` (with or without its .gz) into a file no other holds, to
    pass in its place ("gunzip -k FILE" refused a name without .gz; a .gz name unpacked beside a file of the same
    name asked to replace it)."""
    root, ext = os.path.splitext(path[:-3] if path.endswith(".gz") else path)
    names = (f"{root}{'-unpacked' if k else ''}{f'-{k}' if k > 1 else ''}{ext or '.jsonl'}" for k in itertools.count())
    unpacked = next(n for n in names if n != path and not os.path.lexists(n))  # d.jsonl, d-unpacked.jsonl, d-unpacked-2...
    return (f"the file is gzip-compressed: unpack it (gunzip -c {shlex.quote(path)} > {shlex.quote(unpacked)}) and "
            "pass that file")
