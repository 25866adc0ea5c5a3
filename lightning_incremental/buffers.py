"""Replay storage: a fixed number of batch rows kept on the model's device, and the policies that choose them.

A :class:`ReplayBuffer` stores rows of the user's batches — every tensor of the batch (inputs, labels, task
labels, anything else with a batch dimension), in its own dtype (uint8 images stay uint8) — plus named
extras such as the logits DER records. Storage is allocated once, at the first insertion, on the device of
the batch. Policies:

- ``"reservoir"`` (default): every row of the stream has the same probability ``capacity / seen`` of being
  in the buffer (Vitter's algorithm R); needs no labels and no task boundaries.
- ``"class_balanced"``: class-balanced reservoir (Chrysakis & Moens, 2020): when full, a new row evicts a
  random row of the largest class, so the classes end up equally represented; reads the labels on the host.
- ``"task_balanced"``: the same with the task label (or task index) in place of the class.

Decisions and sampling draw from the buffer's own seeded CPU generator (its state is in ``state_dict``), so
runs are reproducible and a step never waits for the device: indices go to the device as a non-blocking
copy. Insertion costs O(1) amortized per row.
"""

from typing import Any, Literal

import torch
from torch import Tensor

Policy = Literal["reservoir", "class_balanced", "task_balanced"]
POLICIES = ("reservoir", "class_balanced", "task_balanced")


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
    >>> rows, extras, _ = buffer.sample(2)
    >>> rows[0].shape
    torch.Size([2])
    """

    def __init__(self, capacity: int, policy: Policy = "reservoir", seed: int = 0) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`buffer_size` must be a positive integer, got {capacity!r}.")
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
        self.capacity, self.policy = capacity, policy
        self.storage: list[Tensor] = []
        self.extras: dict[str, Tensor] = {}
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
        """Bytes held by the stored rows and extras."""
        return sum(t.numel() * t.element_size() for t in [*self.storage, *self.extras.values()])

    # ------------------------------------------------------------------ insertion
    def add(self, rows: list[Tensor], groups: Tensor | None, extras: dict[str, Tensor] | None = None) -> None:
        """Offer a batch of rows (one tensor per batch leaf, same leading size) to the buffer.

        ``groups`` holds the class (or task) of each row; the balanced policies need it.
        """
        n = rows[0].shape[0]
        extras = extras or {}
        if not self.storage:
            self._allocate(rows, extras)
        if self.policy == "reservoir":
            slots, taken = self._reservoir_slots(n)
            group_list = None
        else:
            if groups is None:
                raise ValueError(f"The {self.policy!r} policy needs the class or task of every row.")
            group_list = groups.tolist()  # the balanced policies decide on the host
            slots, taken = self._balanced_slots(group_list)
        if slots:
            device = self.storage[0].device
            slot_index = torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)
            row_index = torch.tensor(taken, dtype=torch.long).to(rows[0].device, non_blocking=True)
            for store, row in zip(self.storage, rows, strict=True):
                store.index_copy_(0, slot_index, row.detach()[row_index].to(store))
            for name, store in self.extras.items():
                store.index_copy_(0, slot_index, extras[name].detach()[row_index].to(store))
            if group_list is not None:
                self.groups[torch.tensor(slots)] = torch.tensor([group_list[i] for i in taken])

    def _allocate(self, rows: list[Tensor], extras: dict[str, Tensor]) -> None:
        self.storage = [
            torch.zeros((self.capacity, *row.shape[1:]), dtype=row.dtype, device=row.device) for row in rows
        ]
        self.extras = {
            name: torch.zeros((self.capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            for name, t in extras.items()
        }

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
    def sample(self, k: int) -> tuple[list[Tensor], dict[str, Tensor], Tensor]:
        """``k`` rows drawn uniformly with replacement: the rows, their extras and their slot indices."""
        if self.size == 0:
            raise RuntimeError("Cannot sample from an empty replay buffer.")
        index = torch.randint(self.size, (k,), generator=self.generator).to(self.storage[0].device, non_blocking=True)
        rows = [store.index_select(0, index) for store in self.storage]
        extras = {name: store.index_select(0, index) for name, store in self.extras.items()}
        return rows, extras, index

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "capacity": self.capacity,
            "policy": self.policy,
            "storage": [t[: self.size] for t in self.storage],
            "extras": {name: t[: self.size] for name, t in self.extras.items()},
            "groups": self.groups[: self.size].clone(),
            "size": self.size,
            "seen": self.seen,
            "seen_per_group": {str(g): n for g, n in self.seen_per_group.items()},
            "members": {str(g): list(slots) for g, slots in self._members.items()},  # order picks evictions
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
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
        self.storage, self.extras = [], {}
        if state["storage"]:
            saved = state["storage"]
            extras = state["extras"]
            self._allocate([t.to(device) if device else t for t in saved], {n: t for n, t in extras.items()})
            for store, rows in zip(self.storage, saved, strict=True):
                store[:size] = rows.to(store.device)
            for name, store in self.extras.items():
                store[:size] = extras[name].to(store.device)
            if device is not None:
                self.extras = {name: t.to(device) for name, t in self.extras.items()}

    @classmethod
    def pooled(cls, states: list[dict[str, Any]], capacity: int, seed: int = 0) -> "ReplayBuffer":
        """One buffer holding every row of several buffers' states (the shards of the DDP ranks)."""
        buffer = cls(capacity, states[0]["policy"], seed)
        rows = [torch.cat([s["storage"][i] for s in states if s["size"]]) for i in range(len(states[0]["storage"]))]
        size = sum(int(s["size"]) for s in states)
        if size > capacity:
            raise ValueError(f"{size} rows do not fit `buffer_size={capacity}`.")
        merged = {
            "capacity": capacity,
            "policy": states[0]["policy"],
            "storage": rows,
            "extras": {n: torch.cat([s["extras"][n] for s in states if s["size"]]) for n in states[0]["extras"]},
            "groups": torch.cat([s["groups"] for s in states]),
            "size": size,
            "seen": sum(int(s["seen"]) for s in states),
            "seen_per_group": {
                g: sum(int(s["seen_per_group"].get(g, 0)) for s in states)
                for g in {g for s in states for g in s["seen_per_group"]}
            },
            "generator": states[0]["generator"],
        }
        merged["members"] = _members_of(merged["groups"], merged["policy"])
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
            extras={n: t[picked] for n, t in state["extras"].items()},
            groups=state["groups"][picked],
            size=len(picked),
            seen=self.seen // world_size,
            generator=torch.Generator().manual_seed(seed + rank).get_state(),
        )
        state["members"] = _members_of(state["groups"], self.policy)
        buffer = ReplayBuffer(local_capacity, self.policy)
        buffer.load_state_dict(state)
        return buffer


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
