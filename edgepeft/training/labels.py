"""A classifier's class names as training reads them from its data, and the class ids of rows (an --eval file's too)."""
from __future__ import annotations

from edgepeft.errors import DataError


class ClassNames(list):
    """Class names, index = class id (``data.label_names``); ``ints``: the data labelled its rows by integer class
    ids 0..N-1 (names "0", "1", ...), not by names (which may read "0", "1" too)."""

    def __init__(self, names, ints: bool):
        super().__init__(names)
        self.ints = ints

    @property
    def digits(self) -> bool:
        """Names that read as class ids ("0", "1"), given as strings (a CSV's): classes by name (a pairs hunt: told to
        label the rows 0 and 1, which they seemed to be, a reranker's head was replaced)."""
        return not self.ints and all(v.isdigit() for v in self)


def label_ids(rows: list[dict], names: list[str], path: str) -> list[int]:
    """Each row's class id; a label no training row has is a DataError naming its line. Adding training rows with it
    is offered where --data would take them: a label of the training labels' kind (a score, or an integer among
    names, and a name among integers, --data refuses)."""
    index = {name: i for i, name in enumerate(names)}
    ints = getattr(names, "ints", names == list(map(str, range(len(names)))))  # a plain list: told by its names
    ids = []
    for r in rows:
        label = r["label"]
        if str(label) not in index:
            add = f", or add training rows labelled {label!r} to --data" * (
                not isinstance(label, float) and isinstance(label, int) == ints)
            raise DataError(f"{path}:{r['_line']}: label {label!r} is not one of the training labels {list(names)}; "
                            f"use one of those{add}")
        ids.append(index[str(label)])
    return ids
