"""Which kind of store a file is, and opening either kind: for the tools that take any store
(``dali-relabel info``/``verify``)."""
from __future__ import annotations

from typing import Union

from .format import FORMAT_NAME, StoreError
from .reader import LabelStore, summarize
from .region_format import REGION_FORMAT_NAME
from .region_reader import RegionStore, summarize_regions
from .rowfile import format_of

#: The store kinds by their ``format`` attribute: (what they are called, their reader).
KINDS = {FORMAT_NAME: ("label store", LabelStore), REGION_FORMAT_NAME: ("region store", RegionStore)}


def store_kind(path) -> str:
    """``"label store"`` (label maps) or ``"region store"``; :class:`StoreError` for any other file."""
    found = format_of(path)
    if found not in KINDS:
        raise StoreError(path, f"not a dali-relabel store (format attribute is {found!r}; a label-map store says "
                               f"{FORMAT_NAME!r}, a region store {REGION_FORMAT_NAME!r})")
    return KINDS[found][0]


def open_store(path, verify: str = "sample") -> Union[LabelStore, RegionStore]:
    """The store at ``path`` opened with its kind's reader (checked at open as ``verify`` says)."""
    reader = {name: cls for name, cls in KINDS.values()}[store_kind(path)]
    return reader(path, verify=verify)


def summarize_store(store: Union[LabelStore, RegionStore]) -> dict:
    """:func:`~dali_relabel.store.summarize` or :func:`summarize_regions`, with the store's ``kind`` first."""
    if isinstance(store, RegionStore):
        return summarize_regions(store)
    return {"kind": "label store", **summarize(store)}
