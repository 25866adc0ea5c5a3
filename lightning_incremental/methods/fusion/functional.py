r"""Merging task vectors, one task at a time: the math behind :class:`WeightMerging`'s merge modes.

A *task vector* is a mapping from tensor names to fp32 tensors, ``tau = theta_after - theta_0``: what training
changed relative to base weights ``theta_0`` (:func:`task_vector`). Every merge here is **sequential**: an
``*_update`` function folds one more task vector into running *statistics* (a ``dict`` of named-tensor
dicts, updated in place and returned) whose size does not depend on how many task vectors went in, and the
matching ``*_merge`` function turns the statistics into the merged task vector ``m``. The merged weights are
``theta_0 + scale * m``.

- **Task arithmetic** (Ilharco et al., 2023): ``m = sum_t tau_t`` (:func:`sum_update`, :func:`sum_merge`).
- **DARE** (Yu et al., 2024): each task vector first goes through :func:`drop_and_rescale`, then into the sum.
- **TIES** (Yadav et al., 2023): each task vector is trimmed to its largest-magnitude entries
  (:func:`trim_top_k`); per entry the sign with the larger total mass is elected and ``m`` is the mean of
  the trimmed values that agree with it (:func:`ties_update`, :func:`ties_merge`).
- **MagMax** (Marczak et al., 2024): per entry, the value of largest magnitude over all task vectors
  (:func:`magmax_update`, :func:`magmax_merge`).
- **Fisher merging** (Matena & Raffel, 2022): ``m = sum_t F_t tau_t / sum_t F_t`` with each diagonal Fisher
  floored, ``F_t = max(F_t, floor)`` (:func:`fisher_update`, :func:`fisher_merge`).

All statistics are fp32 tensors on the task vectors' device (TIES's counts too: exact up to 2^24 tasks); the
update functions never keep a reference to the task vector they are given. On the CPU the element-wise work
runs over pieces of 65,536 entries, so that the temporaries of a sequence of operations stay in the cache
instead of each operation streaming whole model-sized tensors through memory (``benchmarks/timing/merge_cost.py``
measures the merges; the numbers are in ``benchmarks/RESULTS.md``).
"""

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from lightning_incremental.core.distributed import all_reduce_sum
from lightning_incremental.core.sharding import shard_of

TensorDict = dict[str, Tensor]
Statistics = dict[str, TensorDict]
_PIECE = 1 << 16  # entries per piece of the element-wise work on the CPU


def task_vector(weights: Mapping[str, Tensor], base: Mapping[str, Tensor]) -> TensorDict:
    """``tau = weights - base`` in fp32, name by name (``base``'s names, which ``weights`` must all have).

    >>> task_vector({"w": torch.tensor([1.5, 2.0])}, {"w": torch.tensor([1.0, 3.0])})
    {'w': tensor([ 0.5000, -1.0000])}
    """
    return {name: weights[name].detach().float() - reference.float() for name, reference in base.items()}


def trim_top_k(task_vector: Mapping[str, Tensor], top_k: float, sharded: bool = False) -> TensorDict:
    """TIES's trim: keep the ``top_k`` fraction of entries of largest magnitude, zero the rest.

    The fraction is taken over the whole task vector (all tensors together, as Yadav et al. do), not per
    tensor: ``ceil(top_k * n)`` of its ``n`` entries are kept, and every entry whose magnitude ties with
    the smallest kept one is kept too. With ``sharded``, the tensors are this rank's shards and the fraction is
    taken over every rank's entries together (:func:`kth_largest_over_ranks`), as if unsharded.

    >>> trimmed = trim_top_k({"a": torch.tensor([0.1, -4.0, 0.3]), "b": torch.tensor([2.0, -0.2, 0.0])}, 0.5)
    >>> trimmed["a"], trimmed["b"]
    (tensor([ 0.0000, -4.0000,  0.3000]), tensor([2., 0., 0.]))
    """
    if not 0 < top_k <= 1:
        raise ValueError(f"`top_k` must be in (0, 1] (the fraction of entries kept), got {top_k!r}.")
    sizes = [tensor.numel() for tensor in task_vector.values()]
    first = next(iter(task_vector.values()))
    magnitudes = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
    for part, tensor in zip(magnitudes.split(sizes), task_vector.values(), strict=True):
        torch.abs(tensor.detach().flatten(), out=part)
    total = magnitudes.numel()
    if sharded:
        count = torch.tensor([float(total)], dtype=torch.float64, device=first.device)
        total = int(all_reduce_sum([count])[0].item())
    keep = math.ceil(top_k * total)
    if keep >= total:
        return {name: tensor.clone() for name, tensor in task_vector.items()}
    if sharded:
        threshold = kth_largest_over_ranks(magnitudes.float(), keep).to(magnitudes.dtype)
    else:
        threshold = magnitudes.kthvalue(total - keep + 1).values
    trimmed = {}
    for (name, tensor), flat_magnitudes in zip(task_vector.items(), magnitudes.split(sizes), strict=True):
        trimmed[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        for out, value, magnitude in _pieces(trimmed[name], tensor, flat_magnitudes):
            out.copy_(value).masked_fill_(magnitude < threshold, 0.0)
    return trimmed


def kth_largest_over_ranks(magnitudes: Tensor, k: int) -> Tensor:
    """The ``k``-th largest of every rank's ``magnitudes`` (float32, >= 0) together, without gathering them: a
    bisection on the bits of the threshold, one all-reduce of a count per bit (31 for float32, whose non-negative
    values order as their bit patterns). The value of one of the entries, as ``kthvalue`` of their concatenation.

    >>> kth_largest_over_ranks(torch.tensor([0.5, 3.0, 2.0, 0.0]), 2)
    tensor(2.)
    """
    low, high = 0, 0x7F800000  # the bits of 0.0 and of +inf: the answer lies in [low, high)
    while high - low > 1:  # invariant: at least k entries are >= bits(low), fewer than k are >= bits(high)
        middle = (low + high) // 2
        threshold = torch.tensor(middle, dtype=torch.int32).view(torch.float32).to(magnitudes.device)
        count = (magnitudes >= threshold).sum().to(torch.float64).reshape(1)
        if all_reduce_sum([count])[0].item() >= k:
            low = middle
        else:
            high = middle
    return torch.tensor(low, dtype=torch.int32).view(torch.float32).to(magnitudes.device)


def drop_and_rescale(
    task_vector: Mapping[str, Tensor],
    drop_prob: float,
    generator: torch.Generator | None = None,
    sharded_like: Mapping[str, Tensor] | None = None,
) -> TensorDict:
    """DARE: set each entry to zero with probability ``drop_prob`` and divide the kept ones by ``1 - drop_prob``.

    The result equals ``task_vector`` in expectation. The random draws come from ``generator`` (a CPU
    generator; the global one when ``None``), tensor by tensor in the mapping's order, so the same seed gives
    the same masks on any device. A tensor that is this rank's shard of a parameter of ``sharded_like`` gets its
    part of the draws of the whole parameter: the same masks on any number of ranks.

    >>> drop_and_rescale({"w": torch.arange(1.0, 9.0)}, 0.5, torch.Generator().manual_seed(0))
    {'w': tensor([ 0.,  4.,  0.,  0.,  0., 12.,  0., 16.])}
    """
    if not 0 <= drop_prob < 1:
        raise ValueError(f"`drop_prob` must be in [0, 1) (the probability to drop an entry), got {drop_prob!r}.")
    dropped = {}
    for name, tensor in task_vector.items():
        like = (sharded_like or {}).get(name)
        draws = torch.rand(tensor.shape if like is None else like.shape, generator=generator)
        draws = draws.to(tensor.device) if like is None else shard_of(draws, like)
        dropped[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        for out, value, draw in _pieces(dropped[name], tensor, draws):
            torch.div(value, 1 - drop_prob, out=out).masked_fill_(draw < drop_prob, 0.0)
    return dropped


def sum_update(statistics: Statistics, task_vector: Mapping[str, Tensor]) -> Statistics:
    """Task arithmetic (and DARE): add ``task_vector`` to the running sum ``statistics["sum"]``.

    >>> statistics = sum_update({}, {"w": torch.tensor([1.0, -2.0])})
    >>> sum_merge(sum_update(statistics, {"w": torch.tensor([0.5, 0.5])}))
    {'w': tensor([ 1.5000, -1.5000])}
    """
    total = statistics.setdefault("sum", {})
    for name, tensor in task_vector.items():
        _running(total, name, tensor).add_(tensor)
    return statistics


def sum_merge(statistics: Statistics) -> TensorDict:
    """The merged task vector of task arithmetic: the sum of the task vectors."""
    return {name: tensor.clone() for name, tensor in statistics["sum"].items()}


def ties_update(statistics: Statistics, trimmed: Mapping[str, Tensor]) -> Statistics:
    """TIES: fold a trimmed task vector into the sums and counts of its positive and of its negative entries.

    These four running tensors are all the sign election and the disjoint mean need, so merging the task
    vectors one at a time gives exactly the merge of all of them at once.
    """
    keys = ("positive_sum", "negative_sum", "positive_count", "negative_count")
    for name, tensor in trimmed.items():
        running = [_running(statistics.setdefault(key, {}), name, tensor) for key in keys]
        for value, positive_sum, negative_sum, positive_count, negative_count in _pieces(tensor, *running):
            sign = torch.sign(value)
            positive_sum.add_(value.clamp(min=0))
            negative_sum.add_(value.clamp(max=0))
            positive_count.add_(sign.clamp(min=0))
            negative_count.sub_(sign.clamp_(max=0))
    return statistics


def ties_merge(statistics: Statistics) -> TensorDict:
    """TIES: elect each entry's sign and average the trimmed values that agree with it (the disjoint mean).

    The elected sign is that of the entry's total, ``sum_t trimmed_t``; where the total is exactly zero, the
    sign most entries of the whole vector elected (``+`` on a tie). An entry that no task vector kept is 0.

    >>> statistics = ties_update({}, {"w": torch.tensor([1.0, -2.0, 0.0])})
    >>> ties_merge(ties_update(statistics, {"w": torch.tensor([3.0, 1.0, 0.0])}))
    {'w': tensor([ 2., -2.,  0.])}
    """
    keys = ("positive_sum", "negative_sum", "positive_count", "negative_count")
    votes = 0.0
    for name in statistics["positive_sum"]:
        for positive_sum, negative_sum in _pieces(statistics["positive_sum"][name], statistics["negative_sum"][name]):
            votes += float(torch.sign(positive_sum + negative_sum).sum())
    merged = {}
    for name, like in statistics["positive_sum"].items():
        merged[name] = torch.empty_like(like)
        for out, positive_sum, negative_sum, positive_count, negative_count in _pieces(
            merged[name], *(statistics[key][name] for key in keys)
        ):
            total = positive_sum + negative_sum
            elected_positive = total >= 0 if votes >= 0 else total > 0  # a zero total takes the majority's sign
            count = torch.where(elected_positive, positive_count, negative_count).clamp_(min=1)
            torch.where(elected_positive, positive_sum, negative_sum, out=out).div_(count)
    return merged


def magmax_update(statistics: Statistics, task_vector: Mapping[str, Tensor]) -> Statistics:
    """MagMax: keep, per entry, the value of largest magnitude seen so far (the later task vector on a tie).

    >>> statistics = magmax_update({}, {"w": torch.tensor([1.0, -3.0, 2.0])})
    >>> magmax_merge(magmax_update(statistics, {"w": torch.tensor([-2.0, 1.0, 2.0])}))
    {'w': tensor([-2., -3.,  2.])}
    """
    largest = statistics.setdefault("largest", {})
    for name, tensor in task_vector.items():
        for value, current in _pieces(tensor, _running(largest, name, tensor)):
            torch.where(value.abs() >= current.abs(), value, current, out=current)
    return statistics


def magmax_merge(statistics: Statistics) -> TensorDict:
    """The merged task vector of MagMax: the largest-magnitude value of every entry."""
    return {name: tensor.clone() for name, tensor in statistics["largest"].items()}


def fisher_update(
    statistics: Statistics, task_vector: Mapping[str, Tensor], fisher: Mapping[str, Tensor], floor: float
) -> Statistics:
    """Fisher merging: add ``F * tau`` and ``F`` to their running sums, with ``F = max(fisher, floor)``.

    ``fisher`` holds a diagonal Fisher for every tensor of ``task_vector``; the floor (> 0) keeps every
    entry's total weight positive, so entries no task's Fisher covers get the plain mean of the task vectors.

    >>> statistics = fisher_update({}, {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 0.0])}, 1e-6)
    >>> statistics = fisher_update(statistics, {"w": torch.tensor([5.0, 3.0])}, {"w": torch.tensor([1.0, 0.0])}, 1e-6)
    >>> fisher_merge(statistics)
    {'w': tensor([2., 2.])}
    """
    if not floor > 0:
        raise ValueError(f"The Fisher floor must be > 0 (it keeps every entry's total weight positive), got {floor}.")
    weighted, total = statistics.setdefault("weighted_sum", {}), statistics.setdefault("fisher_sum", {})
    for name, tensor in task_vector.items():
        for value, information, weighted_sum, fisher_sum in _pieces(
            tensor, fisher[name], _running(weighted, name, tensor), _running(total, name, tensor)
        ):
            weight = information.float().clamp(min=floor)
            weighted_sum.addcmul_(weight, value)
            fisher_sum.add_(weight)
    return statistics


def fisher_merge(statistics: Statistics) -> TensorDict:
    """The merged task vector of Fisher merging: ``sum_t F_t tau_t / sum_t F_t``."""
    return {name: weighted / statistics["fisher_sum"][name] for name, weighted in statistics["weighted_sum"].items()}


def _running(statistic: TensorDict, name: str, like: Tensor) -> Tensor:
    """The running fp32 tensor ``statistic[name]``, created as zeros shaped like ``like`` the first time."""
    if name not in statistic:
        statistic[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    return statistic[name]


def _pieces(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """Matching flat pieces of equally sized tensors, of ``_PIECE`` entries on the CPU and whole elsewhere.

    The pieces of a contiguous tensor are views (writes to them land in it); those of another are read-only.
    """
    size = _PIECE if tensors[0].device.type == "cpu" else max(tensors[0].numel(), 1)
    return zip(*(tensor.reshape(-1).split(size) for tensor in tensors), strict=True)
