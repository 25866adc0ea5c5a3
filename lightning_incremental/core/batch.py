"""Reading and rebuilding the user's batches without changing their structure.

A training batch reaches the user's ``training_step`` as ``(x, y)``, ``[x, y]``, ``(x, y, *extra)`` or a
mapping such as ``{"x": ..., "y": ...}``. Methods need the inputs and the labels out of it, and replay
methods need to hand back a batch of the same structure with more rows. Everything here works on any of
those shapes and keeps tuples tuples, lists lists and mappings mappings.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "data")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")
TASK_KEYS = ("t", "task", "task_label", "task_labels", "task_id")


def find_key(batch: Mapping, key: str | None, candidates: tuple[str, ...], role: str, argument: str) -> str:
    if key is not None:
        if key not in batch:
            raise KeyError(f"The batch has no key {key!r} for the {role}; its keys are {sorted(batch)}.")
        return key
    for candidate in candidates:
        if candidate in batch:
            return candidate
    raise KeyError(
        f"Cannot tell which entry of the batch holds the {role}: none of {list(candidates)} is among its keys "
        f"{sorted(batch)}. Pass `model_interface=ModelInterface({argument}=...)` to the method, naming it."
    )


def split_batch(batch: Any, input_key: str | None = None, target_key: str | None = None) -> tuple[Any, Tensor]:
    """Return ``(inputs, targets)`` of a tuple, list or mapping batch.

    Raises a ``ValueError`` naming the fix when the batch carries no labels.

    >>> x, y = torch.zeros(4, 3), torch.arange(4)
    >>> split_batch((x, y))[1].tolist()
    [0, 1, 2, 3]
    >>> split_batch({"image": x, "label": y})[0].shape
    torch.Size([4, 3])
    """
    if isinstance(batch, Mapping):
        inputs = batch[find_key(batch, input_key, INPUT_KEYS, "inputs", "input_key")]
        targets = batch[find_key(batch, target_key, TARGET_KEYS, "labels", "target_key")]
        return inputs, targets
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        f"This method needs labelled batches such as (x, y), [x, y], (x, y, t) or {{'x': x, 'y': y}}, but got "
        f"a {type(batch).__name__}{' of length ' + str(len(batch)) if isinstance(batch, Sequence) else ''}. "
        "Return the labels from your dataset, or use a method that needs no labels."
    )


def split_inputs(batch: Any, input_key: str | None = None) -> Any:
    """Return the inputs of a batch; a bare tensor batch is its own input.

    >>> split_inputs(torch.ones(2, 5)).shape
    torch.Size([2, 5])
    """
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return batch[find_key(batch, input_key, INPUT_KEYS, "inputs", "input_key")]
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        return batch[0]
    raise ValueError(f"Cannot find the inputs in a batch of type {type(batch).__name__}.")


def task_labels_of(batch: Any, task_key: str | None = None) -> Tensor | None:
    """Return the task labels carried by ``(x, y, t)`` or ``{"t": ...}`` batches, else ``None``.

    >>> task_labels_of((torch.zeros(2, 1), torch.zeros(2), torch.tensor([3, 3]))).tolist()
    [3, 3]
    >>> task_labels_of((torch.zeros(2, 1), torch.zeros(2))) is None
    True
    """
    if isinstance(batch, Mapping):
        keys = (task_key,) if task_key is not None else TASK_KEYS
        return next((batch[key] for key in keys if key in batch), None)
    if isinstance(batch, Sequence) and len(batch) >= 3 and isinstance(batch[2], Tensor):
        return batch[2]
    return None


def batch_size_of(batch: Any) -> int:
    """The number of samples in a batch: the leading size of its first tensor.

    >>> batch_size_of({"x": torch.zeros(7, 2), "y": torch.zeros(7)})
    7
    """
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim else None)
    if not sizes:
        raise ValueError(f"The batch ({type(batch).__name__}) holds no tensor with a batch dimension.")
    return sizes[0]


def concat_batches(batch: Any, extra: Any) -> Any:
    """Append the rows of ``extra`` to ``batch``: same structure, device and dtype as ``batch``.

    >>> out = concat_batches((torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(1, 3), torch.tensor([5])))
    >>> type(out).__name__, out[0].shape, out[1].tolist()
    ('tuple', torch.Size([3, 3]), [0, 1, 5])
    """

    joined = [
        torch.cat([current, more.to(device=current.device, dtype=current.dtype)])
        for current, more in zip(batch_leaves(batch), batch_leaves(extra), strict=True)
    ]
    return with_leaves(batch, joined)  # keeps a mapping's key order


def index_batch(batch: Any, index: Tensor | slice) -> Any:
    """Select rows of every tensor of a batch.

    >>> index_batch([torch.arange(5), torch.arange(5) * 2], slice(3, None))
    [tensor([3, 4]), tensor([6, 8])]
    """
    return apply_to_collection(batch, Tensor, lambda t: t[index])


def batch_leaves(batch: Any) -> list[Tensor]:
    """The tensors of a batch, in a fixed traversal order (the order :func:`with_leaves` refills).

    >>> [t.tolist() for t in batch_leaves({"x": torch.tensor([1]), "y": torch.tensor([2])})]
    [[1], [2]]
    """
    leaves: list[Tensor] = []
    apply_to_collection(batch, Tensor, leaves.append)
    return leaves


def with_leaves(batch: Any, leaves: list[Tensor]) -> Any:
    """A batch of the same structure as ``batch`` whose tensors are ``leaves``, in :func:`batch_leaves` order.

    A stored batch (replay, exemplars) whose number of tensors differs from ``batch``'s raises: every task
    must yield batches of one structure.

    >>> with_leaves((torch.zeros(1), torch.zeros(1)), [torch.ones(2), torch.ones(2) * 3])
    (tensor([1., 1.]), tensor([3., 3.]))
    """
    expected = len(batch_leaves(batch))
    if len(leaves) != expected:
        raise RuntimeError(
            f"The stored rows are batches of {len(leaves)} tensors but this batch has {expected}: every task must "
            "yield batches of the same structure."
        )
    replacements = iter(leaves)
    return apply_to_collection(batch, Tensor, lambda _: next(replacements))
