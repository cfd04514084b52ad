"""KV-cache groups: which layers share a block table, and which page tensor ("slot") each layer uses.

A hybrid model mixes attention kinds (full attention; a sliding window W). Layers of one kind need the
same blocks for a sequence, so they share one block table; a windowed group can give back the blocks
that fall out of its window. All groups draw block ids from ONE allocator with no split between them,
which needs every block id to mean the same bytes in every group: the layers are cut into groups of
``group_size`` layers, and the pool has ``group_size`` page tensors ("slots"), slot ``s`` shared by the
``s``-th layer of every group (vLLM's hybrid allocator does the same, so a plan reads like its log).

Grouping rule (vLLM 0.19, ``_get_kv_cache_groups_uniform_page_size``): ``group_size`` is the smallest
kind's layer count, or the largest kind's when that is under 1.5x the smallest; each kind's layers are
dealt round-robin into ``ceil(count / group_size)`` groups (``layers[i::n]``), so only the last group of a
kind can be short; its missing layers are *padding* (slots it never writes).

>>> g = kv_groups([None if (i + 1) % 6 == 0 else 1024 for i in range(62)])  # Gemma-3-27B: 5 local : 1 global
>>> g.group_size, len(g.groups), g.padding_layers, g.windows
(10, 7, 8, (1024, 1024, 1024, 1024, 1024, 1024, None))
>>> g.slot_of(5)  # layer 5 (global) is the first layer of the full group: group 6, slot 0
(6, 0)

A model with one attention kind is one group of all its layers: slot ``i`` is layer ``i``, exactly the
single-table pool kvpool has always had.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroup:
    """One KV-cache group: its attention window (None: full attention) and its layers, slot by slot."""

    window: int | None
    layers: tuple[int, ...]


@dataclass(frozen=True)
class KVGroups:
    """A model's KV-cache groups.

    Attributes
    ----------
    groups : tuple of KVGroup
        Every group, kinds in order of their first layer; group ``g``'s ``layers[s]`` uses slot ``s``.
    group_size : int
        Page tensors (slots) per K/V: every block id spans one page in each slot.
    num_layers : int
        Attention layers of the model.
    """

    groups: tuple[KVGroup, ...]
    group_size: int
    num_layers: int

    @property
    def windows(self) -> tuple:
        """Each group's window (None: full attention), the ``group_windows`` of `kvpool.BlockTables`."""
        return tuple(g.window for g in self.groups)

    @property
    def padding_layers(self) -> int:
        """Slots some group never writes: ``len(groups) * group_size - num_layers``."""
        return len(self.groups) * self.group_size - self.num_layers

    @property
    def hybrid(self) -> bool:
        return len(self.groups) > 1

    def slot_of(self, layer: int) -> tuple[int, int]:
        """``(group, slot)`` of ``layer``."""
        for g, group in enumerate(self.groups):
            if layer in group.layers:
                return g, group.layers.index(layer)
        raise ValueError(f"layer {layer} is not one of the model's {self.num_layers} attention layers")


def kv_groups(layer_windows) -> KVGroups:
    """The KV-cache groups of a model whose layer ``i`` has window ``layer_windows[i]`` (None: full)."""
    windows = list(layer_windows)
    if not windows:
        raise ValueError("a model needs at least one attention layer to have KV-cache groups")
    kinds = Counter(windows)  # insertion-ordered: kinds in order of their first layer
    smallest, largest = min(kinds.values()), max(kinds.values())
    size = largest if largest < 1.5 * smallest else smallest
    groups = []
    for window in kinds:
        layers = [i for i, w in enumerate(windows) if w == window]
        n = -(-len(layers) // size)
        groups += [KVGroup(window, tuple(layers[i::n])) for i in range(n)]
    return KVGroups(tuple(groups), size, len(windows))


__all__ = ["KVGroup", "KVGroups", "kv_groups"]
