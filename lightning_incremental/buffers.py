"""Replay storage: a fixed number of batch rows kept on the model's device, and the policies that choose them.

A :class:`ReplayBuffer` stores rows of the user's batches — every tensor of the batch (inputs, labels, task
labels, anything else with a batch dimension), in its own dtype (uint8 images stay uint8) — plus named
extras such as the logits DER records. Storage is allocated at the first insertion, on the device of the
batch. Policies:

- ``"reservoir"`` (default): every row of the stream has the same probability ``capacity / seen`` of being
  in the buffer (Vitter's algorithm R); needs no labels and no task boundaries, and serves any target.
- ``"class_balanced"``: class-balanced reservoir (Chrysakis & Moens, 2020): when full, a new row evicts a
  random row of the largest class, so the classes end up equally represented; reads the labels on the host.
- ``"task_balanced"``: the same with the task label (or task index) in place of the class.

**Sequences.** A tensor whose second dimension changes from batch to batch (token ids, attention masks and
token labels ``[B, T]``, token-level logits ``[B, T, V]``) is stored per row: its storage is padded to the
longest row seen so far (it grows when a longer one comes) and every slot records its row's length, which is
the length of the batch the row came in. A sample is padded to its longest row only, with the tensor's pad
value (:func:`pad_values_for` picks one per batch entry); every other dimension must stay the same.

Decisions and sampling draw from the buffer's own seeded CPU generator (its state is in ``state_dict``), so
runs are reproducible and a step never waits for the device: the sampled slots and the lengths are known on
the host, and the slots go to the device as a non-blocking copy. A sample is one ``index_select`` per tensor.
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from lightning_incremental.core import IGNORE_INDEX, batch_leaves, with_leaves

Policy = Literal["reservoir", "class_balanced", "task_balanced"]
POLICIES = ("reservoir", "class_balanced", "task_balanced")
LABEL_KEYS = ("labels", "label", "target", "targets", "y")
PadValue = int | float


class Sample(NamedTuple):
    """Rows drawn from a :class:`ReplayBuffer`.

    Attributes:
        rows: one tensor per batch leaf; a sequence leaf is padded to the longest row drawn.
        extras: the stored extras of those rows, padded the same way (with 0).
        index: the slots drawn, on the storage's device.
        extra_masks: for every extra whose length varies, a bool ``[k, T]`` tensor that is ``True`` at the
            positions the row held when it was stored (``False`` at padding).
    """

    rows: list[Tensor]
    extras: dict[str, Tensor]
    index: Tensor
    extra_masks: dict[str, Tensor]


class ReplayBuffer:
    """Fixed-size storage of batch rows with a replacement policy.

    Args:
        capacity: how many rows it holds (> 0).
        policy: ``"reservoir"``, ``"class_balanced"`` or ``"task_balanced"``.
        seed: seed of its generator.

    >>> buffer = ReplayBuffer(capacity=4, seed=0)
    >>> for start in range(0, 12, 3):
    ...     buffer.add([torch.arange(start, start + 3)], groups=None)
    >>> len(buffer), buffer.seen
    (4, 12)
    >>> buffer.sample(2).rows[0].shape
    torch.Size([2])

    Rows of different lengths, padded to the longest row drawn:

    >>> tokens = ReplayBuffer(capacity=2, seed=0)
    >>> tokens.add([torch.tensor([[5, 6]])], groups=None, pad_values=[1])
    >>> tokens.add([torch.tensor([[7, 8, 9]])], groups=None)
    >>> tokens.storage[0].tolist(), tokens.lengths[0].tolist()
    ([[5, 6, 1], [7, 8, 9]], [2, 3])
    """

    def __init__(self, capacity: int, policy: Policy = "reservoir", seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`buffer_size` must be a positive integer, got {capacity!r}.")
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
        self.capacity, self.policy = capacity, policy
        self.storage: list[Tensor] = []  # one per batch leaf: [capacity, *row shape]
        self.lengths: list[Tensor | None] = []  # per leaf: each slot's length (host) once the length varies
        self.pad_values: list[PadValue] = []  # per leaf
        self.extras: dict[str, Tensor] = {}
        self.extra_lengths: dict[str, Tensor] = {}  # the extras whose length varies (padded with 0)
        self.groups = torch.full((capacity,), -1, dtype=torch.long)  # class or task of each slot (host)
        self.size = 0
        self.seen = 0
        self.seen_per_group: dict[int, int] = {}
        self._members: dict[int, list[int]] = {}  # the slots of each group (balanced policies)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds: the storage allocated for all ``capacity`` slots of every leaf and extra (on
        their device; a sequence leaf's padded to the longest row seen), plus the host bookkeeping of each slot
        (its group and, for sequences, its length). Allocated, not just filled: a buffer holding one row
        reports the same as a full one."""
        tensors = [*self.storage, *self.extras.values(), self.groups, *self.extra_lengths.values()]
        tensors += [lengths for lengths in self.lengths if lengths is not None]
        return sum(t.untyped_storage().nbytes() for t in tensors)

    def to(self, device: torch.device | str) -> "ReplayBuffer":
        """Move the stored rows and extras to ``device`` (the bookkeeping stays on the host); returns ``self``."""
        self.storage = [t.to(device) for t in self.storage]
        self.extras = {name: t.to(device) for name, t in self.extras.items()}
        return self

    # ------------------------------------------------------------------ insertion
    def add(
        self,
        rows: list[Tensor],
        groups: Tensor | None,
        extras: dict[str, Tensor] | None = None,
        pad_values: list[PadValue] | None = None,
    ) -> None:
        """Offer a batch of rows (one tensor per batch leaf, same leading size) to the buffer.

        ``groups`` holds the class (or task) of each row; the balanced policies need it. ``pad_values`` (one per
        leaf, default 0) is read at the first insertion and kept: the value a leaf is padded with when its rows
        differ in length.
        """
        extras = extras or {}
        if not self.storage:
            self._allocate(rows, extras, pad_values)
        elif len(rows) != len(self.storage) or extras.keys() != self.extras.keys():
            raise RuntimeError(
                f"The buffer stores batches of {len(self.storage)} tensors with extras {sorted(self.extras)}, but "
                f"got {len(rows)} tensors with extras {sorted(extras)}: every task must yield batches of the same "
                "structure."
            )
        n = rows[0].shape[0]
        if self.policy == "reservoir":
            slots, taken = self._reservoir_slots(n)
            group_list = None
        else:
            if groups is None:
                raise ValueError(f"The {self.policy!r} policy needs the class or task of every row.")
            group_list = groups.tolist()  # the balanced policies decide on the host
            slots, taken = self._balanced_slots(group_list)
        if not slots:
            return
        slot_host = torch.tensor(slots, dtype=torch.long)
        slot_index = slot_host.to(self.storage[0].device, non_blocking=True)
        row_index = torch.tensor(taken, dtype=torch.long).to(rows[0].device, non_blocking=True)
        for i, row in enumerate(rows):
            self.storage[i], self.lengths[i] = _write(
                self.storage[i], self.lengths[i], slot_host, slot_index, row.detach()[row_index], self.pad_values[i]
            )
        for name, extra in extras.items():
            self.extras[name], lengths = _write(
                self.extras[name], self.extra_lengths.get(name), slot_host, slot_index, extra.detach()[row_index], 0
            )
            if lengths is not None:
                self.extra_lengths[name] = lengths
        if group_list is not None:
            self.groups[slot_host] = torch.tensor([group_list[i] for i in taken])

    def _allocate(
        self, rows: list[Tensor], extras: dict[str, Tensor], pad_values: list[PadValue] | None = None
    ) -> None:
        if pad_values is not None and len(pad_values) != len(rows):
            raise ValueError(f"`pad_values` has {len(pad_values)} entries for a batch of {len(rows)} tensors.")
        self.pad_values = list(pad_values) if pad_values is not None else [0] * len(rows)
        self.storage = [
            row.new_full((self.capacity, *row.shape[1:]), pad) for row, pad in zip(rows, self.pad_values, strict=True)
        ]
        self.lengths = [None] * len(rows)
        self.extras = {name: t.new_zeros((self.capacity, *t.shape[1:])) for name, t in extras.items()}
        self.extra_lengths = {}

    def _reservoir_slots(self, n: int) -> tuple[list[int], list[int]]:
        """Algorithm R for ``n`` rows at once; a slot chosen twice keeps the later row."""
        chosen: dict[int, int] = {}
        free = min(self.capacity - self.size, n)
        for row in range(free):
            chosen[self.size + row] = row
        self.size += free
        if free < n:
            positions = torch.arange(self.seen + free, self.seen + n, dtype=torch.float64) + 1
            draws = (torch.rand(n - free, generator=self.generator, dtype=torch.float64) * positions).long()
            for offset, slot in enumerate(draws.tolist()):
                if slot < self.capacity:
                    chosen[slot] = free + offset
        self.seen += n
        return list(chosen), list(chosen.values())

    def _balanced_slots(self, groups: list[int]) -> tuple[list[int], list[int]]:
        chosen: dict[int, int] = {}
        for row, group in enumerate(groups):
            self.seen += 1
            self.seen_per_group[group] = self.seen_per_group.get(group, 0) + 1
            members = self._members.setdefault(group, [])
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                largest = max(len(slots) for slots in self._members.values())
                if len(members) < largest:  # evict a random row of a largest group
                    candidates = [g for g, slots in self._members.items() if len(slots) == largest]
                    victim = candidates[self._draw(len(candidates))]
                else:  # a largest group itself: stay a reservoir over its own rows
                    if torch.rand(1, generator=self.generator).item() >= len(members) / self.seen_per_group[group]:
                        continue
                    victim = group
                slot = self._evict(victim)
            members.append(slot)
            self.groups[slot] = group
            chosen[slot] = row
        return list(chosen), list(chosen.values())

    def _draw(self, n: int) -> int:
        return int(torch.randint(n, (1,), generator=self.generator))

    def _evict(self, group: int) -> int:
        slots = self._members[group]
        position = self._draw(len(slots))
        slots[position], slots[-1] = slots[-1], slots[position]
        return slots.pop()

    # ------------------------------------------------------------------ sampling
    def sample(self, k: int) -> Sample:
        """``k`` rows drawn uniformly with replacement, sequence leaves padded to the longest row drawn."""
        if self.size == 0:
            raise RuntimeError("Cannot sample from an empty replay buffer.")
        slots = torch.randint(self.size, (k,), generator=self.generator)
        index = slots.to(self.storage[0].device, non_blocking=True)
        rows = [
            _read(store, lengths, slots, index)[0] for store, lengths in zip(self.storage, self.lengths, strict=True)
        ]
        extras, masks = {}, {}
        for name, store in self.extras.items():
            extras[name], lengths = _read(store, self.extra_lengths.get(name), slots, index)
            if lengths is not None:
                positions = torch.arange(extras[name].shape[1], device=store.device)
                masks[name] = positions < lengths.to(store.device, non_blocking=True)[:, None]
        return Sample(rows, extras, index, masks)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        size = self.size
        return {
            "capacity": self.capacity,
            "policy": self.policy,
            "storage": [t[:size].clone() for t in self.storage],
            "lengths": {str(i): t[:size].clone() for i, t in enumerate(self.lengths) if t is not None},
            "pad_values": list(self.pad_values),
            "extras": {name: t[:size].clone() for name, t in self.extras.items()},
            "extra_lengths": {name: t[:size].clone() for name, t in self.extra_lengths.items()},
            "groups": self.groups[:size].clone(),
            "size": size,
            "seen": self.seen,
            "seen_per_group": {str(g): n for g, n in self.seen_per_group.items()},
            "members": {str(g): list(slots) for g, slots in self._members.items()},  # order picks evictions
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the rows stay on the device they were saved from (see :meth:`to`)."""
        if state["policy"] != self.policy:
            raise ValueError(f"The saved buffer used the {state['policy']!r} policy, this one {self.policy!r}.")
        size = int(state["size"])
        if size > self.capacity:
            raise ValueError(f"The saved buffer holds {size} rows, more than `buffer_size={self.capacity}`.")
        self.size, self.seen = size, int(state["seen"])
        self.seen_per_group = {int(g): int(n) for g, n in state["seen_per_group"].items()}
        self.generator.set_state(state["generator"])
        self.groups = torch.full((self.capacity,), -1, dtype=torch.long)
        self.groups[:size] = state["groups"]
        self._members = {int(g): [int(slot) for slot in slots] for g, slots in state["members"].items()}
        self.storage, self.lengths, self.extras, self.extra_lengths = [], [], {}, {}
        self.pad_values = list(state["pad_values"])
        for i, (saved, pad) in enumerate(zip(state["storage"], self.pad_values, strict=True)):
            store, lengths = self._restore(saved, state["lengths"].get(str(i)), pad)
            self.storage.append(store)
            self.lengths.append(lengths)
        for name, saved in state["extras"].items():
            self.extras[name], lengths = self._restore(saved, state["extra_lengths"].get(name), 0)
            if lengths is not None:
                self.extra_lengths[name] = lengths

    def _restore(self, saved: Tensor, lengths: Tensor | None, pad: PadValue) -> tuple[Tensor, Tensor | None]:
        store = saved.new_full((self.capacity, *saved.shape[1:]), pad)
        store[: self.size] = saved
        if lengths is None:
            return store, None
        full = torch.full((self.capacity,), store.shape[1], dtype=torch.long)
        full[: self.size] = lengths
        return store, full

    @classmethod
    def pooled(cls, states: list[dict[str, Any]], capacity: int, seed: int = 0) -> "ReplayBuffer":
        """One buffer holding every row of several buffers' states (the shards of the DDP ranks)."""
        size = sum(int(s["size"]) for s in states)
        if size > capacity:
            raise ValueError(f"{size} rows do not fit `buffer_size={capacity}`.")
        filled = [s for s in states if s["size"]]
        pad_values = filled[0]["pad_values"] if filled else []
        merged: dict[str, Any] = {
            "capacity": capacity,
            "policy": states[0]["policy"],
            "storage": [],
            "lengths": {},
            "pad_values": pad_values,
            "extras": {},
            "extra_lengths": {},
            "groups": torch.cat([s["groups"] for s in states]),
            "size": size,
            "seen": sum(int(s["seen"]) for s in states),
            "seen_per_group": {
                g: sum(int(s["seen_per_group"].get(g, 0)) for s in states)
                for g in {g for s in states for g in s["seen_per_group"]}
            },
            "generator": states[0]["generator"],
        }
        for i, pad in enumerate(pad_values):
            rows, lengths = _pool([(s["storage"][i], s["lengths"].get(str(i))) for s in filled], pad)
            merged["storage"].append(rows)
            if lengths is not None:
                merged["lengths"][str(i)] = lengths
        for name in filled[0]["extras"] if filled else {}:
            merged["extras"][name], lengths = _pool(
                [(s["extras"][name], s["extra_lengths"].get(name)) for s in filled], 0
            )
            if lengths is not None:
                merged["extra_lengths"][name] = lengths
        merged["members"] = _members_of(merged["groups"], merged["policy"])
        buffer = cls(capacity, states[0]["policy"], seed)
        buffer.load_state_dict(merged)
        return buffer

    def share(self, rank: int, world_size: int, seed: int) -> "ReplayBuffer":
        """The rows a DDP rank holds of this (global) buffer: every ``world_size``-th row from ``rank``."""
        local_capacity = local_share(self.capacity, rank, world_size)
        state = self.state_dict()
        picked = torch.arange(rank, max(rank, self.size), world_size)
        state.update(
            capacity=local_capacity,
            storage=[t[picked] for t in state["storage"]],
            lengths={i: t[picked] for i, t in state["lengths"].items()},
            extras={n: t[picked] for n, t in state["extras"].items()},
            extra_lengths={n: t[picked] for n, t in state["extra_lengths"].items()},
            groups=state["groups"][picked],
            size=len(picked),
            seen=self.seen // world_size,
            generator=torch.Generator().manual_seed(seed + rank).get_state(),
        )
        state["members"] = _members_of(state["groups"], self.policy)
        buffer = ReplayBuffer(local_capacity, self.policy)
        buffer.load_state_dict(state)
        return buffer


# ---------------------------------------------------------------------------------------------- sequences
def pad_length(tensor: Tensor, length: int, value: PadValue) -> Tensor:
    """``tensor`` (``[B, T, ...]``) padded with ``value`` along its second dimension to ``length`` (>= ``T``).

    >>> pad_length(torch.tensor([[1, 2]]), 4, -100).tolist()
    [[1, 2, -100, -100]]
    """
    if tensor.shape[1] == length:
        return tensor
    padded = tensor.new_full((tensor.shape[0], length, *tensor.shape[2:]), value)
    padded[:, : tensor.shape[1]] = tensor
    return padded


def concat_padded(batch: Any, extra: Any, pad_values: Sequence[PadValue]) -> Any:
    """Append the rows of ``extra`` to ``batch`` (same structure, device and dtype as ``batch``); a leaf whose
    lengths differ (second dimension) is padded to the longer one first, with its value in ``pad_values``.

    >>> batch = {"input_ids": torch.tensor([[3, 4, 0]]), "labels": torch.tensor([[1, 2, -100]])}
    >>> extra = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[0, 1, 1, 0]])}
    >>> concat_padded(batch, extra, [0, -100])["labels"].tolist()
    [[1, 2, -100, -100], [0, 1, 1, 0]]
    """
    joined = []
    for current, more, pad in zip(batch_leaves(batch), batch_leaves(extra), pad_values, strict=True):
        more = more.to(device=current.device, dtype=current.dtype)
        if current.ndim >= 2 and current.shape[1] != more.shape[1]:
            length = max(current.shape[1], more.shape[1])
            current, more = pad_length(current, length, pad), pad_length(more, length, pad)
        joined.append(torch.cat([current, more]))
    return with_leaves(batch, joined)


def pad_values_for(
    batch: Any, targets: Tensor | None = None, given: Mapping[str, PadValue] | None = None
) -> list[PadValue]:
    """The value each tensor of ``batch`` (in :func:`~lightning_incremental.core.batch_leaves` order) is padded
    with when its rows differ in length, chosen by the entry's key:

    - ``given[key]`` when ``given`` names the key (``pad_values={"input_ids": 1}``);
    - ``-100`` (the ignored label) for integer labels: the batch's ``targets`` tensor, or an entry named
      ``labels``, ``label``, ``target``, ``targets`` or ``y``;
    - for an entry named ``input_ids`` (or ``*_input_ids``): the pad id the data shows, the one value it
      holds where its attention mask (``attention_mask``, ``decoder_attention_mask``) is 0; 0 when this batch
      has no padding, or more than one value there;
    - 0 otherwise (attention masks, token type ids, features; ``False`` for bool tensors).

    >>> batch = {"input_ids": torch.tensor([[4, 5, 1]]), "attention_mask": torch.tensor([[1, 1, 0]]),
    ...          "labels": torch.tensor([[2, 3, -100]])}
    >>> pad_values_for(batch)
    [1, 0, -100]
    >>> pad_values_for(batch, given={"input_ids": 7})
    [7, 0, -100]
    """
    given = dict(given or {})
    leaves = batch_leaves(batch)
    named = _named_leaves(batch)
    names = [name for name, _ in named] if [t for _, t in named] == leaves else [None] * len(leaves)
    siblings = {name: tensor for name, tensor in named if name is not None}
    unknown = sorted(set(given) - set(siblings))
    if unknown:
        raise ValueError(
            f"`pad_values` names {unknown}, which the batch does not hold; its keys are {sorted(siblings)}."
        )
    pads: list[PadValue] = []
    for name, tensor in zip(names, leaves, strict=True):
        if name in given:
            pads.append(given[name])
        elif _has_integer_dtype(tensor) and (tensor is targets or name in LABEL_KEYS):
            pads.append(IGNORE_INDEX)
        elif name is not None and name.endswith("input_ids"):
            pads.append(_pad_id(tensor, siblings.get(name[: -len("input_ids")] + "attention_mask")))
        else:
            pads.append(False if tensor.dtype == torch.bool else 0)
    return pads


def _has_integer_dtype(tensor: Tensor) -> bool:
    return tensor.dtype in (torch.int16, torch.int32, torch.int64)


def _pad_id(ids: Tensor, mask: Tensor | None) -> int:
    """The one value ``ids`` hold where ``mask`` is 0, else 0 (one host sync, at the first insertion)."""
    if mask is None or mask.shape != ids.shape:
        return 0
    values = ids[mask == 0].unique()
    return int(values) if values.numel() == 1 else 0


def _named_leaves(batch: Any, name: str | None = None) -> list[tuple[str | None, Tensor]]:
    """Every tensor of ``batch`` with the key of the mapping entry that holds it, in ``batch_leaves`` order."""
    if isinstance(batch, Tensor):
        return [(name, batch)]
    if isinstance(batch, Mapping):
        return [leaf for key, value in batch.items() for leaf in _named_leaves(value, str(key))]
    if isinstance(batch, (list, tuple)):
        return [leaf for value in batch for leaf in _named_leaves(value, None)]
    return [(None, t) for t in batch_leaves(batch)]


def _write(
    store: Tensor, lengths: Tensor | None, slot_host: Tensor, slots: Tensor, rows: Tensor, pad: PadValue
) -> tuple[Tensor, Tensor | None]:
    """Write ``rows`` into ``slots`` of ``store``: the storage grows when they are longer, they are padded when
    shorter, and each slot's length is recorded once lengths vary. Returns the (new) storage and lengths."""
    if rows.ndim != store.ndim or rows.shape[2:] != store.shape[2:]:
        raise ValueError(
            f"A batch tensor with rows of shape {tuple(rows.shape[1:])} meets stored rows of shape "
            f"{tuple(store.shape[1:])}: only the second dimension (a sequence's length) may change from batch to batch."
        )
    length = rows.shape[1] if rows.ndim >= 2 else 0
    if rows.ndim >= 2 and (lengths is not None or length != store.shape[1]):
        if lengths is None:  # every row so far had the storage's length
            lengths = torch.full((store.shape[0],), store.shape[1], dtype=torch.long)
        if length > store.shape[1]:
            store = pad_length(store, length, pad)
        rows = pad_length(rows, store.shape[1], pad)
        lengths[slot_host] = length
    store.index_copy_(0, slots, rows.to(store))
    return store, lengths


def _read(store: Tensor, lengths: Tensor | None, slot_host: Tensor, slots: Tensor) -> tuple[Tensor, Tensor | None]:
    """The rows in ``slots``; a sequence cut to its longest row drawn, with each row's length."""
    if lengths is None:
        return store.index_select(0, slots), None
    drawn = lengths[slot_host]
    return store[:, : int(drawn.max())].index_select(0, slots), drawn


def _pool(shards: list[tuple[Tensor, Tensor | None]], pad: PadValue) -> tuple[Tensor, Tensor | None]:
    """The rows of several shards in one tensor, padded to the longest, with each row's length when they vary."""
    rows = [t for t, _ in shards]
    if rows[0].ndim < 2:
        return torch.cat(rows), None
    longest = max(t.shape[1] for t in rows)
    if all(own is None and t.shape[1] == longest for t, own in shards):
        return torch.cat(rows), None
    lengths = [torch.full((len(t),), t.shape[1], dtype=torch.long) if own is None else own for t, own in shards]
    return torch.cat([pad_length(t, longest, pad) for t in rows]), torch.cat(lengths)


def _members_of(groups: Tensor, policy: str) -> dict[str, list[int]]:
    """The slots of every group, for a buffer laid out anew (the balanced policies' bookkeeping)."""
    members: dict[str, list[int]] = {}
    if policy != "reservoir":
        for slot, group in enumerate(groups.tolist()):
            members.setdefault(str(group), []).append(slot)
    return members


def local_share(capacity: int, rank: int, world_size: int) -> int:
    """How many of ``capacity`` rows rank ``rank`` of ``world_size`` holds (they add up to ``capacity``)."""
    return capacity // world_size + (1 if rank < capacity % world_size else 0)
