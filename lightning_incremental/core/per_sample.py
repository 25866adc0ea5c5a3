"""Sums over samples of squared (or absolute) per-sample gradients: the diagonal Fisher of EWC, MAS's
importance, and any other importance built from per-sample gradients.

``sum_n phi(d loss_n / d theta)`` with ``phi`` = square or abs cannot be read off the gradient of a batch
(that is ``phi`` of a sum, not a sum of ``phi``). Two exact ways compute it here:

- **Layer fast path** for ``nn.Linear`` (on ``[batch, features]`` or sequence inputs ``[batch, tokens, features]``)
  and ``nn.Conv2d`` (groups 1): one forward and one backward of the summed loss give, per layer, the input
  ``a_n`` and the output gradient ``delta_n`` of every sample; the per-sample weight gradient is
  ``delta_n a_n^T`` (Linear), ``sum_t delta_nt a_nt^T`` (Linear over tokens) or ``delta_n unfold(a_n)^T``
  (Conv2d), so the sum needs one matmul per layer — the cost of a training step, not of ``batch`` backward
  passes. For Linear on ``[batch, features]``, ``phi(delta a^T) = phi(delta) phi(a)^T`` elementwise, so not
  even the per-sample gradients are materialised.
- **torch.func fallback** for every other parameter (norm layers, embeddings, a layer called twice):
  ``vmap(grad(loss))`` over ``functional_call``, in chunks of ``chunk_size`` samples to bound memory. A forward
  that ``torch.func`` cannot trace (data-dependent control flow, such as a Hugging Face model's attention-mask
  handling) falls back to one backward per sample.

Both require samples to be independent in the forward: the model runs in eval mode (BatchNorm uses its
running statistics and is not updated).
"""

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from lightning_incremental.core.batch import batch_size_of

ForwardFn = Callable[[nn.Module, Any], Tensor]
PerSampleLoss = Callable[[Tensor, Any], Tensor]
Reduction = Literal["square", "abs"]


def _phi(tensor: Tensor, reduction: Reduction) -> Tensor:
    return tensor.square() if reduction == "square" else tensor.abs()


class _ForwardAdapter(nn.Module):
    """Turns ``forward(module, batch)`` into a module call, so ``functional_call`` can swap its parameters."""

    def __init__(self, module: nn.Module, forward: ForwardFn) -> None:
        super().__init__()
        self.module = module
        self.forward_fn = forward

    def forward(self, batch: Any) -> Tensor:
        return self.forward_fn(self.module, batch)


class _LayerTaps:
    """Forward hooks that record the input and keep the output of fast-path layers during one forward."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(layers, 0)
        self.handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.calls[name] += 1
            self.inputs[name] = args[0].detach()
            self.outputs[name] = output

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _fast_path_layers(module: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    wanted = {id(p) for p in params.values()}
    layers = {}
    for name, layer in module.named_modules():
        if (isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)) and id(
            layer.weight
        ) in wanted:
            layers[name] = layer
    return layers


def without_fast_path(module: nn.Module, params: dict[str, nn.Parameter]) -> list[str]:
    """The names of ``params`` that no layer rule covers (not the weight or bias of an ``nn.Linear`` or a
    groups-1 ``nn.Conv2d``): their sums need ``torch.func`` or a backward per sample.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    >>> without_fast_path(model, dict(model.named_parameters()))
    ['1.weight', '1.bias']
    """
    covered = {id(t) for layer in _fast_path_layers(module, params).values() for t in (layer.weight, layer.bias)}
    return [name for name, p in params.items() if id(p) not in covered]


def _linear_sums(a: Tensor, delta: Tensor, has_bias: bool, reduction: Reduction) -> list[Tensor]:
    a, delta = _phi(a, reduction), _phi(delta, reduction)
    sums = [delta.T @ a]
    if has_bias:
        sums.append(delta.sum(0))
    return sums


def _sequence_linear_sums(
    a: Tensor, delta: Tensor, has_bias: bool, reduction: Reduction, chunk_size: int
) -> list[Tensor]:
    """Linear on ``[n, ..., in]`` inputs: ``sum_n phi(sum_t delta_nt a_nt^T)``, in chunks of samples."""
    a, delta = a.flatten(1, -2), delta.flatten(1, -2)
    weight_sum = a.new_zeros(delta.shape[-1], a.shape[-1])
    bias_sum = a.new_zeros(delta.shape[-1]) if has_bias else None
    for start in range(0, a.shape[0], chunk_size):
        a_chunk, delta_chunk = a[start : start + chunk_size], delta[start : start + chunk_size]
        weight_sum += _phi(torch.einsum("nto,nti->noi", delta_chunk, a_chunk), reduction).sum(0)
        if bias_sum is not None:
            bias_sum += _phi(delta_chunk.sum(1), reduction).sum(0)
    return [weight_sum, *([bias_sum] if bias_sum is not None else [])]


def _conv_sums(layer: nn.Conv2d, a: Tensor, delta: Tensor, reduction: Reduction, chunk_size: int) -> list[Tensor]:
    weight_sum = a.new_zeros(layer.weight.shape).flatten(1)
    bias_sum = a.new_zeros(layer.bias.shape) if layer.bias is not None else None
    for start in range(0, a.shape[0], chunk_size):
        a_chunk, delta_chunk = a[start : start + chunk_size], delta[start : start + chunk_size]
        unfolded = F.unfold(a_chunk, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        per_sample = torch.bmm(delta_chunk.flatten(2), unfolded.transpose(1, 2))  # [n, out, in * k * k]
        weight_sum += _phi(per_sample, reduction).sum(0)
        if bias_sum is not None:
            bias_sum += _phi(delta_chunk.sum((2, 3)), reduction).sum(0)
    return [weight_sum.view_as(layer.weight), *([bias_sum] if bias_sum is not None else [])]


def per_sample_grad_sums(
    module: nn.Module,
    batches: Iterable[Any],
    per_sample_loss: PerSampleLoss,
    forward: ForwardFn,
    reduction: Reduction = "square",
    params: dict[str, nn.Parameter] | None = None,
    chunk_size: int = 64,
) -> tuple[dict[str, Tensor], int]:
    """``sum_n phi(grad of loss_n)`` for every parameter, over all samples of ``batches``; and ``n``.

    Args:
        module: the model; it should be in eval mode (samples must not interact in the forward).
        batches: batches already on the module's device.
        per_sample_loss: ``(outputs, batch) -> losses`` of shape ``[batch]``, or ``[batch, k]`` for ``k``
            losses per sample whose ``phi``-gradients are all summed (e.g. one per class).
        forward: ``(module, batch) -> outputs``.
        reduction: ``"square"`` (sum of squared gradients, the diagonal empirical Fisher when the loss is
            the negative log-likelihood) or ``"abs"`` (sum of absolute gradients).
        params: the parameters to compute, by name; default every parameter that requires grad.
        chunk_size: samples per chunk of the torch.func fallback and of the Conv2d path.

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> nll = lambda out, batch: F.cross_entropy(out, batch[1], reduction="none")
    >>> sums, n = per_sample_grad_sums(model, [(x, y)], nll, lambda m, batch: m(batch[0]))
    >>> by_loop = sum(torch.autograd.grad(nll(model(x[i : i + 1]), (x, y[i : i + 1])).sum(), model[0].weight)[0] ** 2
    ...               for i in range(5))
    >>> n, torch.allclose(sums["0.weight"], by_loop, atol=1e-6)
    (5, True)
    """
    if reduction not in ("square", "abs"):
        raise ValueError(f"`reduction` must be 'square' or 'abs', got {reduction!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    params = params if params is not None else {n: p for n, p in module.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    layers = _fast_path_layers(module, params)
    names_of = {id(p): name for name, p in params.items()}
    seen = 0
    for batch in batches:
        seen += batch_size_of(batch)
        covered = _fast_path_batch(
            module, batch, per_sample_loss, forward, layers, names_of, sums, reduction, chunk_size
        )
        rest = {name: p for name, p in params.items() if name not in covered}
        if rest:
            _fallback_batch(module, batch, per_sample_loss, forward, rest, sums, reduction, chunk_size)
    return sums, seen


def _fast_path_batch(
    module: nn.Module,
    batch: Any,
    per_sample_loss: PerSampleLoss,
    forward: ForwardFn,
    layers: dict[str, nn.Module],
    names_of: dict[int, str],
    sums: dict[str, Tensor],
    reduction: Reduction,
    chunk_size: int,
) -> set[str]:
    """Accumulate the fast-path layers' sums for one batch; return the parameter names covered."""
    if not layers:
        return set()
    taps = _LayerTaps(layers)
    try:
        with torch.enable_grad():
            losses = per_sample_loss(forward(module, batch), batch)
    finally:
        taps.remove()
    usable = {
        name: layer
        for name, layer in layers.items()
        if taps.calls[name] == 1 and (isinstance(layer, nn.Conv2d) or taps.inputs[name].ndim >= 2)
    }
    if not usable:
        return set()
    outputs = [taps.outputs[name] for name in usable]
    columns = losses.reshape(losses.shape[0], -1)
    for column in range(columns.shape[1]):
        deltas = torch.autograd.grad(
            columns[:, column].sum(), outputs, retain_graph=column + 1 < columns.shape[1], allow_unused=True
        )
        for (name, layer), delta in zip(usable.items(), deltas, strict=True):
            if delta is None:
                continue
            a, delta = taps.inputs[name].float(), delta.float()
            if isinstance(layer, nn.Linear) and a.ndim == 2:
                layer_sums = _linear_sums(a, delta, layer.bias is not None, reduction)
            elif isinstance(layer, nn.Linear):
                layer_sums = _sequence_linear_sums(a, delta, layer.bias is not None, reduction, chunk_size)
            else:
                layer_sums = _conv_sums(layer, a, delta, reduction, chunk_size)
            for param, value in zip((layer.weight, layer.bias), layer_sums, strict=False):
                sums[names_of[id(param)]] += value
    covered = set()
    for layer in usable.values():
        covered.add(names_of[id(layer.weight)])
        if layer.bias is not None and id(layer.bias) in names_of:
            covered.add(names_of[id(layer.bias)])
    return covered


def _fallback_batch(
    module: nn.Module,
    batch: Any,
    per_sample_loss: PerSampleLoss,
    forward: ForwardFn,
    params: dict[str, nn.Parameter],
    sums: dict[str, Tensor],
    reduction: Reduction,
    chunk_size: int,
) -> None:
    """``vmap(grad(...))`` over samples for the parameters the fast path does not cover."""
    adapter = _ForwardAdapter(module, forward)
    trainable = {f"module.{name}": p.detach() for name, p in params.items()}
    fixed = {name: t.detach() for name, t in adapter.named_parameters() if name not in trainable}
    fixed.update({name: b for name, b in adapter.named_buffers()})
    unsqueeze = lambda sample: _map_tensors(sample, lambda t: t.unsqueeze(0))  # noqa: E731

    def column_loss(trainable: dict[str, Tensor], sample: Any, column: int) -> Tensor:
        sample_batch = unsqueeze(sample)
        outputs = functional_call(adapter, {**fixed, **trainable}, (sample_batch,))
        return per_sample_loss(outputs, sample_batch).reshape(1, -1)[0, column]

    with torch.no_grad():
        first = _map_tensors(batch, lambda t: t[:1])
        n_columns = per_sample_loss(forward(module, first), first).reshape(1, -1).shape[1]
    n = batch_size_of(batch)
    try:
        partial = {name: torch.zeros_like(total) for name, total in sums.items() if name in params}
        for column in range(n_columns):
            per_sample = vmap(grad(column_loss), in_dims=(None, 0, None))
            for start in range(0, n, chunk_size):
                chunk = _map_tensors(batch, lambda t, s=start: t[s : s + chunk_size])
                grads = per_sample(trainable, chunk, column)
                for name in params:
                    partial[name] += _phi(grads[f"module.{name}"].float(), reduction).sum(0)
    except (RuntimeError, NotImplementedError):  # a forward torch.func cannot trace: one backward per sample
        partial = _loop_batch(module, batch, per_sample_loss, forward, params, reduction, n_columns)
    for name, value in partial.items():
        sums[name] += value


def _loop_batch(
    module: nn.Module,
    batch: Any,
    per_sample_loss: PerSampleLoss,
    forward: ForwardFn,
    params: dict[str, nn.Parameter],
    reduction: Reduction,
    n_columns: int,
) -> dict[str, Tensor]:
    """``sum_n phi(grad of loss_n)`` by one forward and ``n_columns`` backward passes per sample."""
    totals = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    names, tensors = list(params), list(params.values())
    for row in range(batch_size_of(batch)):
        sample = _map_tensors(batch, lambda t, r=row: t[r : r + 1])
        with torch.enable_grad():
            losses = per_sample_loss(forward(module, sample), sample).reshape(-1)
            for column in range(n_columns):
                grads = torch.autograd.grad(
                    losses[column], tensors, retain_graph=column + 1 < n_columns, allow_unused=True
                )
                for name, gradient in zip(names, grads, strict=True):
                    if gradient is not None:
                        totals[name] += _phi(gradient.float(), reduction)
    return totals


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    return apply_to_collection(batch, Tensor, fn)
