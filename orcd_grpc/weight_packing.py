"""Weight packing: which tensors of a file load as one matrix, declared per architecture as data
(`Adapter.packing`, a tuple of `Pack`) and applied here, once, at load.

A pack concatenates per-layer tensors by rows (same input, so one matmul launch does the work of
several: Q/K/V, gate/up), and the F32 biases of those tensors likewise. `plan` turns a file and its
adapter's packs into the list of weights to load (`Plan.entries`); the loader sizes memory from
that list (`Plan.nbytes`) and loads the very same list (`Entry.raw`), so the admission estimate and
what is loaded cannot drift apart. Adapters never concatenate: their forward reads the packed name
when it was loaded and the parts otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quants
from .gguf_model import GGUFModel

@dataclass(frozen=True)
class Switches:
    """Which packs a load may apply. fuse: any at all. widen: parts of different types that all
    widen exactly to Q8_0 (qwen2.5's Q4_K_M files: Q/K Q5_0, V Q8_0) fuse as one Q8_0 matrix:
    qwen2.5-0.5b's B=1 step 1,157 -> 1,048 us (H100, 2026-11-23). qk: packs marked `switch="qk"`
    (Q and K alone where V's type still differs: 1,318 -> 1,232 us with ORCD_SPLIT_VIEWS, same
    day)."""
    fuse: bool = True
    qk: bool = True
    widen: bool = True

    @classmethod
    def from_env(cls, env=None) -> "Switches":
        """ORCD_FUSE_WEIGHTS, ORCD_FUSE_QK, ORCD_FUSE_WIDEN, as the tuning registry reads them."""
        from .tuning import Tuning

        t = Tuning.from_env(env)
        return cls(fuse=t.fuse_weights, qk=t.fuse_qk, widen=t.fuse_widen)

    def allows(self, switch: str) -> bool:
        return not switch or bool(getattr(self, switch))


@dataclass(frozen=True)
class Pack:
    """Per-layer tensors ("blk.{i}." + part) loaded as one row-concatenated weight "blk.{i}." +
    name, in the order of `parts`. It applies to a layer when every part is loaded, the parts share
    a storage type (or all are in `widen`, the types that may mix: each is then re-encoded as
    Q8_0), and their biases are all absent or all F32 (then they pack too, as name's .bias).
    Packs are tried in order and a tensor joins one pack at most, so a later pack over a subset of
    an earlier one's parts is that pack's fallback. switch: a `Switches` field that must be on."""
    name: str
    parts: tuple[str, ...]
    widen: frozenset = frozenset()
    switch: str = ""

    def bias_of(self, name: str) -> str:
        return name.removesuffix(".weight") + ".bias"


@dataclass(frozen=True)
class Entry:
    """One weight as loaded: a tensor of the file as it is, or a pack of several."""
    name: str
    parts: tuple  # the file's tensors (gguf ReaderTensors), concatenated by rows
    qtype: quants.T
    shape: tuple[int, ...]
    widened: bool = False  # parts re-encoded as Q8_0

    @property
    def file_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.parts)

    @property
    def nbytes(self) -> int:
        """The bytes load_weight receives (a widened part takes Q8_0's)."""
        if self.widened:
            return quants.nbytes(quants.T.Q8_0, self.shape)
        return self.file_bytes

    def raw(self):
        """What load_weight takes: the file's own data for a lone tensor, else the parts' bytes
        concatenated (widened first where the types mix)."""
        if len(self.parts) == 1 and not self.widened:
            return self.parts[0].data
        raws = [np.ascontiguousarray(t.data).reshape(-1).view(np.uint8) for t in self.parts]
        if self.widened:
            raws = [quants.widen_to_q8_0(r, t.tensor_type) for r, t in zip(raws, self.parts)]
        return np.concatenate(raws)


@dataclass
class Plan:
    """The weights a load makes resident, in load order: the file's tensors that join no pack (in
    file order), then the packs (layer by layer, each bias before its weight)."""
    entries: list[Entry]

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def packed(self) -> dict[str, list[str]]:
        """Packed name -> the names of its parts."""
        return {e.name: [t.name for t in e.parts] for e in self.entries if len(e.parts) > 1}

    def nbytes(self, backend) -> tuple[int, int]:
        """(total, largest) bytes the backend will hold for these weights."""
        sizes = [backend.weight_nbytes(e.qtype, e.shape, e.nbytes) for e in self.entries]
        return sum(sizes), max(sizes, default=0)


def _entry(name: str, tensors: list) -> Entry:
    shapes = [GGUFModel.logical_shape(t) for t in tensors]
    types = {int(t.tensor_type) for t in tensors}
    widened = len(types) > 1
    qtype = quants.T.Q8_0 if widened else quants.T(int(tensors[0].tensor_type))
    shape = shapes[0] if len(tensors) == 1 else (sum(s[0] for s in shapes), *shapes[0][1:])
    return Entry(name, tuple(tensors), qtype, shape, widened)


def _pack_layer(pack: Pack, prefix: str, loaded: dict, taken: set, switches: Switches) -> list[Entry]:
    names = [prefix + p for p in pack.parts]
    if any(n not in loaded or n in taken for n in names):
        return []
    types = {int(loaded[n].tensor_type) for n in names}
    if len(types) != 1 and not (switches.widen and types <= {int(t) for t in pack.widen}):
        return []
    out = []
    biases = [pack.bias_of(n) for n in names]
    if any(b in loaded for b in biases):
        if not all(b in loaded and int(loaded[b].tensor_type) == int(quants.T.F32) for b in biases):
            return []
        out.append(_entry(pack.bias_of(prefix + pack.name), [loaded[b] for b in biases]))
    out.append(_entry(prefix + pack.name, [loaded[n] for n in names]))
    taken.update(names)
    taken.update(b for b in biases if b in loaded)
    return out


def plan(tensors: list, packing, n_layers: int, switches: Switches | None = None) -> Plan:
    """The load plan of `tensors` (the file's tensors the forward pass reads, in file order) under
    an adapter's `packing` for layers [0, n_layers)."""
    switches = Switches.from_env() if switches is None else switches
    loaded = {t.name: t for t in tensors}
    taken: set[str] = set()
    packed: list[Entry] = []
    if switches.fuse:
        for i in range(n_layers):
            for pack in packing:
                if switches.allows(pack.switch):
                    packed += _pack_layer(pack, f"blk.{i}.", loaded, taken, switches)
    return Plan([_entry(t.name, [t]) for t in tensors if t.name not in taken] + packed)
