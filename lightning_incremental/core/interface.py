"""How every method reads the user's model: the outputs for a batch, the targets, and a per-sample loss.

One :class:`ModelInterface` serves every method, so a model that works with one method works with all of them.
The defaults cover the batches and models Lightning users write:

- ``(x, y)``, ``[x, y]``, ``(x, y, *extra)``: the model is called as ``model(x)``, the targets are ``y``;
- mappings with named entries (``{"x": ..., "y": ...}``, ``{"image": ..., "label": ...}``): the model is
  called with the input entry, the targets are the label entry;
- Hugging Face-style mappings (``{"input_ids", "attention_mask", "labels"}``): the model is called with every
  entry but the labels as keyword arguments, ``model(**inputs)``;
- outputs that are a tensor, an object or mapping with ``.logits`` (Hugging Face), or a ``(logits, features)``
  tuple: the logits are the tensor, ``.logits`` or the first element.

The per-sample loss follows the targets (``likelihood="auto"``): integer class labels give the categorical
negative log-likelihood (token-level logits ``[B, T, V]`` with labels ``[B, T]`` too; labels of ``-100`` are
ignored), real-valued targets the Gaussian one (half the squared error), 0/1 targets of the logits' own shape
the Bernoulli one (multi-label). Name the likelihood, or give your own per-sample loss, where ``auto`` guesses
wrong.

Override it in one place: pass ``model_interface=ModelInterface(...)`` to a method, or set a
``continual_interface`` attribute on your LightningModule, which every method then uses.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_incremental.core.batch import INPUT_KEYS, TARGET_KEYS, TASK_KEYS, find_key
from lightning_incremental.core.targets import IGNORE_INDEX

Likelihood = Literal["auto", "categorical", "gaussian", "bernoulli"]
LIKELIHOODS = ("auto", "categorical", "gaussian", "bernoulli")
PerSampleLossFn = Callable[[Tensor, Tensor], Tensor]

# entries of a mapping batch that Hugging Face models take as keyword arguments
HF_INPUT_KEYS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features")
INTERFACE_ATTRIBUTE = "continual_interface"


class ModelInterface:
    """Reads the model's outputs, the targets and a per-sample loss from the user's batches.

    Args:
        input_key: the entry of a mapping batch that holds the inputs (default: the first of ``x``, ``input``,
            ``inputs``, ``image``, ``images``, ``features``, ``data``; Hugging Face-style batches pass every
            entry but the targets).
        target_key: the entry of a mapping batch that holds the targets (default: the first of ``y``,
            ``target``, ``targets``, ``label``, ``labels``).
        likelihood: the per-sample negative log-likelihood: ``"categorical"`` (class logits),
            ``"gaussian"`` (half the squared error), ``"bernoulli"`` (multi-label logits), or ``"auto"``.
        per_sample_loss: ``per_sample_loss(logits, targets) -> [batch]``, your own per-sample loss; replaces
            ``likelihood``.
        forward: ``forward(module, batch) -> outputs``, how to call the model on a batch (default above).
        logits: ``logits(outputs) -> tensor``, how to read the logits from the model's outputs (default above).
        causal: whether the logits at position ``t`` score the token at ``t + 1`` (a causal language model, whose
            labels are its input ids with ``-100`` where no loss is wanted): the per-sample loss then pairs them, as
            Hugging Face's own loss does. ``None``: detected from the model called (a ``*ForCausalLM`` or
            ``*LMHeadModel`` module within it).

    Example::

        >>> model = nn.Linear(3, 1)
        >>> interface = ModelInterface()
        >>> batch = (torch.randn(4, 3), torch.randn(4))
        >>> outputs = interface.logits(interface.forward(model, batch))
        >>> interface.likelihood_of(outputs, interface.targets(batch))
        'gaussian'
        >>> interface.per_sample_loss(outputs, batch).shape
        torch.Size([4])
    """

    def __init__(
        self,
        input_key: str | None = None,
        target_key: str | None = None,
        likelihood: Likelihood = "auto",
        per_sample_loss: PerSampleLossFn | None = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        causal: bool | None = None,
    ) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"`likelihood` must be one of {LIKELIHOODS}, got {likelihood!r}.")
        for name, value in (("per_sample_loss", per_sample_loss), ("forward", forward), ("logits", logits)):
            if value is not None and not callable(value):
                raise TypeError(f"`{name}` must be a callable or None, got {type(value).__name__}.")
        self.input_key, self.target_key = input_key, target_key
        self.likelihood = likelihood
        self._per_sample_loss, self._forward, self._logits = per_sample_loss, forward, logits
        if causal is not None and not isinstance(causal, bool):
            raise TypeError(f"`causal` must be True, False or None (detected), got {causal!r}.")
        self.causal = causal
        self._causal_models: dict[int, bool] = {}  # id(model called) -> whether it is a causal language model
        self._called_causal = False  # whether the model of the last forward is one

    # ------------------------------------------------------------------ reading a batch
    def inputs(self, batch: Any) -> Any:
        """What the model is called with: a tensor, or a dict of keyword arguments (Hugging Face style)."""
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, Mapping):
            hf_style = any(key in batch for key in HF_INPUT_KEYS) and not any(key in batch for key in INPUT_KEYS)
            if self.input_key is None and hf_style:
                excluded = {self.target_key, *TARGET_KEYS, *TASK_KEYS}
                return {key: value for key, value in batch.items() if key not in excluded}
            return batch[find_key(batch, self.input_key, INPUT_KEYS, "inputs", "input_key")]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
            return batch[0]
        raise TypeError(
            f"Cannot find the inputs in a batch of type {type(batch).__name__}. Pass "
            "`model_interface=ModelInterface(forward=...)` saying how to call the model on it."
        )

    def targets(self, batch: Any) -> Tensor:
        """The targets of a batch; a batch without them raises an error that names the fix."""
        if isinstance(batch, Mapping):
            return batch[find_key(batch, self.target_key, TARGET_KEYS, "targets", "target_key")]
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
            return batch[1]
        described = f"a {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
        raise ValueError(
            f"This method needs the targets of every batch, as in (x, y), [x, y], (x, y, t) or {{'x': x, 'y': y}}, "
            f"but got {described}. Return the targets from your dataset, or use a method that needs none."
        )

    def has_targets(self, batch: Any) -> bool:
        try:
            self.targets(batch)
        except (KeyError, ValueError):
            return False
        return True

    # ------------------------------------------------------------------ calling the model
    def forward(self, module: nn.Module, batch: Any) -> Any:
        """The model's raw outputs for ``batch``: ``module(x)`` or ``module(**inputs)``.

        A LightningModule without a ``forward`` of its own (its ``training_step`` calls ``self.model(**batch)``) is
        called through its one submodule with parameters, the wrapped model."""
        if self._forward is not None:
            return self._forward(module, batch)
        self._called_causal = self.is_causal(module)
        module = model_within(module)
        inputs = self.inputs(batch)
        if isinstance(inputs, Mapping):
            return module(**inputs)
        return module(inputs)

    def logits(self, outputs: Any) -> Tensor:
        """The logits (or real-valued predictions) within the model's outputs."""
        if self._logits is not None:
            return self._logits(outputs)
        found = outputs
        if not isinstance(found, Tensor):
            if isinstance(found, Mapping) and "logits" in found:
                found = found["logits"]
            elif hasattr(found, "logits"):
                found = found.logits
            elif isinstance(found, Sequence) and found and isinstance(found[0], Tensor):
                found = found[0]
        if not isinstance(found, Tensor) or not found.is_floating_point():
            raise TypeError(
                f"Cannot find the logits in the model's output of type {type(outputs).__name__}: expected a floating "
                "tensor, an output with `.logits`, or a (logits, features) tuple. Pass "
                "`model_interface=ModelInterface(logits=lambda outputs: ...)` to say where they are."
            )
        return found

    def predict(self, module: nn.Module, batch: Any) -> Tensor:
        """The logits of ``module`` for ``batch``."""
        return self.logits(self.forward(module, batch))

    # ------------------------------------------------------------------ the per-sample loss
    def likelihood_of(self, logits: Tensor, targets: Tensor) -> str:
        """The likelihood that fits these logits and targets: the one given, or ``auto``'s choice.

        >>> ModelInterface().likelihood_of(torch.zeros(2, 3), torch.tensor([0, 2]))
        'categorical'
        >>> ModelInterface().likelihood_of(torch.zeros(2, 3), torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]))
        'bernoulli'
        """
        if self._per_sample_loss is not None:
            return "custom"
        if self.likelihood != "auto":
            return self.likelihood
        if not targets.is_floating_point() and not targets.is_complex():
            if targets.dtype == torch.bool or (targets.shape == logits.shape and logits.shape[-1] > 1):
                return "bernoulli"
            return "categorical"
        if targets.shape == logits.shape and logits.shape[-1] > 1 and bool(((targets == 0) | (targets == 1)).all()):
            return "bernoulli"
        return "gaussian"

    def per_sample_loss(self, logits: Tensor, batch: Any) -> Tensor:
        """The negative log-likelihood of every sample of ``batch``, shape ``[batch]``, in fp32."""
        targets = self.targets(batch)
        if self._per_sample_loss is not None:
            return self._per_sample_loss(logits, targets)
        if self.shifts_labels and logits.ndim == 3 and targets.shape == logits.shape[:2]:
            logits, targets = logits[:, :-1], targets[:, 1:]  # position t scores the token at t + 1
        return per_sample_nll(logits, targets, self.likelihood_of(logits, targets))

    def is_causal(self, module: nn.Module) -> bool:
        """Whether ``module``'s logits at position ``t`` score the token at ``t + 1``: ``causal``, else whether a
        ``*ForCausalLM`` or ``*LMHeadModel`` module is within it (looked up once per module)."""
        if self.causal is not None:
            return self.causal
        if id(module) not in self._causal_models:
            self._causal_models[id(module)] = any(
                type(m).__name__.endswith(("ForCausalLM", "LMHeadModel")) for m in module.modules()
            )
        return self._causal_models[id(module)]

    def answer_positions(self, module: nn.Module, logits: Tensor, batch: Any) -> Tensor:
        """The positions ``[B, T]`` of token-level logits ``[B, T, V]`` that a token-level term covers: those that
        score a labelled token (label not ``-100``; for a causal LM the position before it), so a prompt and the
        padding carry no term. Without token labels, the ``attention_mask``'s positions, else all of them."""
        rows, length = logits.shape[:2]
        if self.has_targets(batch):
            targets = self.targets(batch)
            if targets.shape == (rows, length) and not targets.is_floating_point():
                labelled = targets != IGNORE_INDEX
                if not self.is_causal(module):
                    return labelled
                before = torch.zeros_like(labelled)
                before[:, :-1] = labelled[:, 1:]
                return before
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.shape == (rows, length):
            return mask.bool()
        return torch.ones(rows, length, dtype=torch.bool, device=logits.device)

    @property
    def shifts_labels(self) -> bool:
        """Whether the per-sample loss pairs the logits at ``t`` with the label at ``t + 1``: ``causal``, or detected
        from the model of the last forward."""
        return self.causal if self.causal is not None else self._called_causal


def per_sample_nll(logits: Tensor, targets: Tensor, likelihood: str) -> Tensor:
    """The negative log-likelihood of each sample (row) under ``likelihood``, in fp32.

    - ``categorical``: ``-log softmax(logits)[y]``; for token-level logits ``[B, T, V]`` and labels ``[B, T]``
      the mean over the row's tokens whose label is not ``-100`` (0 for a row without any).
    - ``gaussian``: ``0.5 * sum (logits - y)^2`` over the row's outputs (unit variance).
    - ``bernoulli``: the binary cross-entropy of every output, summed over the row.

    >>> per_sample_nll(torch.tensor([[0.0, 0.0]]), torch.tensor([1]), "categorical")
    tensor([0.6931])
    >>> per_sample_nll(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]), "gaussian")
    tensor([0.5000, 2.0000])
    >>> per_sample_nll(torch.zeros(1, 3, 2), torch.tensor([[0, -100, 1]]), "categorical")
    tensor([0.6931])
    """
    logits = logits.float()
    if likelihood == "categorical":
        if targets.is_floating_point():
            raise ValueError(
                "The categorical likelihood needs integer class labels, but the targets are floating point. Use "
                "`ModelInterface(likelihood='gaussian')` for real-valued targets."
            )
        targets = targets.long()
        if logits.ndim == targets.ndim + 1:
            losses = F.cross_entropy(logits.movedim(-1, 1), targets, ignore_index=IGNORE_INDEX, reduction="none")
            if losses.ndim == 1:
                return losses
            valid = (targets != IGNORE_INDEX).flatten(1).sum(1).clamp_min(1)
            return losses.flatten(1).sum(1) / valid
        raise ValueError(
            f"Class logits of shape {tuple(logits.shape)} do not fit labels of shape {tuple(targets.shape)}: "
            "the logits need one more (class) dimension than the labels. Pass `model_interface=ModelInterface("
            "likelihood=...)` or your own `per_sample_loss`."
        )
    targets = targets.to(logits.dtype)
    if targets.shape != logits.shape:
        if targets.numel() != logits.numel():
            raise ValueError(
                f"Predictions of shape {tuple(logits.shape)} do not fit targets of shape {tuple(targets.shape)}. "
                "Pass `model_interface=ModelInterface(per_sample_loss=...)`."
            )
        targets = targets.reshape(logits.shape)
    if likelihood == "gaussian":
        return 0.5 * (logits - targets).square().flatten(1).sum(1)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).sum(1)
    raise ValueError(f"Unknown likelihood {likelihood!r}; choose from {LIKELIHOODS}.")


def model_within(module: nn.Module) -> nn.Module:
    """``module``, or its one child with parameters when ``module`` defines no ``forward`` (a LightningModule that
    wraps a Hugging Face model as ``self.model``); refused, with the fix, when there is no such single child."""
    owner = next(cls for cls in type(module).__mro__ if "forward" in cls.__dict__)
    if owner not in (nn.Module, LightningModule):  # a forward of the user's own
        return module
    children = [child for child in module.children() if next(child.parameters(), None) is not None]
    if len(children) == 1:
        return children[0]
    names = [name for name, child in module.named_children() if child in children]
    raise TypeError(
        f"{type(module).__name__} defines no `forward`, and the methods cannot tell which of its submodules "
        f"{names} is the model to call on a batch. Define `forward` (e.g. `def forward(self, **batch): return "
        "self.model(**batch)`), or set `continual_interface = ModelInterface(forward=lambda module, batch: "
        "module.model(**batch))` on it."
    )


def interface_of(pl_module: nn.Module, given: ModelInterface | None) -> ModelInterface:
    """The interface a method uses: the one passed to it, else the model's ``continual_interface``, else the
    default."""
    if given is not None:
        return given
    attached = getattr(pl_module, INTERFACE_ATTRIBUTE, None)
    if attached is None:
        return ModelInterface()
    if not isinstance(attached, ModelInterface):
        raise TypeError(
            f"`{type(pl_module).__name__}.{INTERFACE_ATTRIBUTE}` must be a lightning_incremental.ModelInterface, "
            f"got {type(attached).__name__}."
        )
    return attached


def check_interface_argument(model_interface: Any) -> ModelInterface | None:
    """Validate a method's ``model_interface`` argument."""
    if model_interface is not None and not isinstance(model_interface, ModelInterface):
        raise TypeError(
            f"`model_interface` must be a lightning_incremental.ModelInterface or None, got "
            f"{type(model_interface).__name__}."
        )
    return model_interface
