"""Sending the public corpus: which supplier identifiers belong to one partner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def partner_groups(id_sets: Iterable[Sequence[str]]) -> dict[str, str]:
    """identifier -> partner name (p000, p001, ...): identifiers that ever appear together in one
    document's supplier belong to one partner."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for ids in id_sets:
        for i in ids:
            parent[find(i)] = find(ids[0])
    roots = sorted({find(i) for i in parent})
    return {i: f"p{roots.index(find(i)):03d}" for i in parent}
