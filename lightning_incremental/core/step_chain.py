"""The step chain: one ``training_step`` wrapper through which every method's wrapper runs, in callback order.

A method that overrides :meth:`~lightning_incremental.core.ContinualCallback.wrap_training_step` receives the
batch and a :class:`Step`, the rest of the chain. It may pass the inner step another batch (replay appends
rows) and may add to the loss the inner step returns (distillation). The first callback in the Trainer's list
is the outermost wrapper; the user's own ``training_step`` is innermost, and runs once per step.

**Outputs, recorded once.** While the user's ``training_step`` runs, the chain records the output of the
model's logits module with a forward hook (never on the LightningModule: under DDP its forward is the whole
step). Every method reads that one record: ``step.logits_for(batch)`` gives the logits of the rows of
``batch``, the batch the method itself passed in. Methods that extend the batch append rows, so a method's own
rows are the first rows the model saw.

**What an inner method sees of an outer method's rows.** Exactly what the outer method passes it: a method
after :class:`~lightning_incremental.ExperienceReplay` in the callback list receives the current rows plus
the replayed ones, and treats them all alike (LwF distils on the replayed rows too); a method before it sees
only the current rows. ``docs/architecture.md`` has the table.

**The logits module** is the one a method names (``logits_module=``; methods that name different modules are
refused), or found on first use by :mod:`lightning_incremental.core.classifier`: the outermost submodule whose
output is the very tensor the model returns as logits. When the hook records nothing during a step (a
``torch.compile``-d model runs a graph that skips Python hooks), the logits come from one extra forward of the
batch instead, with a warning.
"""

import functools
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import Tensor, nn

from lightning_incremental.core.batch import batch_size_of
from lightning_incremental.core.classifier import logits_producers, resolve_submodule
from lightning_incremental.core.interface import ModelInterface, interface_of

if TYPE_CHECKING:
    from lightning_incremental.core.base import ContinualCallback

CHAIN_ATTRIBUTE = "_lightning_incremental_step_chain"


class StepChain:
    """The one ``training_step`` wrapper on a LightningModule; installed by the first method that wraps the step,
    removed when the last one lets go (the module's own ``training_step`` is back, bit for bit)."""

    def __init__(self, pl_module: LightningModule, trainer: Trainer) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.user_defined_attribute = "training_step" in pl_module.__dict__
        self.original = pl_module.training_step
        self.callbacks: list[ContinualCallback] = []
        self.logits_module: nn.Module | None = None
        self.logits_name: str | None = None
        self._step_args: tuple[tuple, dict] = ((), {})
        self._warned_extra_forward = False

        @functools.wraps(self.original)
        def training_step(batch: Any, *args: Any, **kwargs: Any) -> STEP_OUTPUT:
            self._step_args = (args, kwargs)
            callbacks = list(self.callbacks)
            record = _Record(needed=any(cb.reads_step_outputs for cb in callbacks))
            return Step(self, callbacks, 0, record)(batch)

        self.wrapper = training_step

    # ------------------------------------------------------------------ attaching
    @classmethod
    def attach(cls, pl_module: LightningModule, callback: "ContinualCallback", trainer: Trainer) -> "StepChain":
        chain = pl_module.__dict__.get(CHAIN_ATTRIBUTE)
        if chain is None:
            chain = cls(pl_module, trainer)
            pl_module.__dict__[CHAIN_ATTRIBUTE] = chain
            pl_module.__dict__["training_step"] = chain.wrapper
        chain.trainer = trainer
        if callback not in chain.callbacks:
            chain.callbacks.append(callback)
            order = {id(cb): i for i, cb in enumerate(trainer.callbacks)}
            chain.callbacks.sort(key=lambda cb: order.get(id(cb), len(order)))
        chain._name_logits_module()
        return chain

    @staticmethod
    def of(pl_module: LightningModule) -> "StepChain | None":
        return pl_module.__dict__.get(CHAIN_ATTRIBUTE)

    @staticmethod
    def detach(pl_module: LightningModule, callback: "ContinualCallback") -> None:
        chain = pl_module.__dict__.get(CHAIN_ATTRIBUTE)
        if chain is None or callback not in chain.callbacks:
            return
        chain.callbacks.remove(callback)
        if chain.callbacks:
            return
        del pl_module.__dict__[CHAIN_ATTRIBUTE]
        if chain.user_defined_attribute:
            pl_module.__dict__["training_step"] = chain.original
        else:
            del pl_module.__dict__["training_step"]

    # ------------------------------------------------------------------ the user's own step and loss
    def user_loss(self, batch: Any) -> Tensor | None:
        """The loss of the user's own ``training_step`` on ``batch`` (no method's wrapper, logging muted), or
        ``None`` when the step skips the batch. Methods use it for the task loss on rows they add outside the
        user's batch (A-GEM's reference gradient, DER++'s label term)."""
        args, kwargs = self._step_args
        with _muted_logging(self.pl_module):
            output = self.original(batch, *args, **kwargs)
        if output is None:
            return None
        if isinstance(output, Tensor):
            return output
        if isinstance(output, dict) and "loss" in output:
            return output["loss"]
        raise TypeError(
            f"training_step returned a {type(output).__name__}; continual methods need a loss tensor or a dict "
            "with a 'loss' key."
        )

    # ------------------------------------------------------------------ the logits module
    def _name_logits_module(self) -> None:
        """Adopt the logits module the methods name; refuse two different ones."""
        named = {cb.logits_module for cb in self.callbacks if getattr(cb, "logits_module", None) is not None}
        if len(named) > 1:
            raise ValueError(
                f"The methods in this Trainer name different logits modules ({sorted(map(str, named))}); the "
                "model has one output. Pass the same `logits_module=` to every method (or none, to find it)."
            )
        if not named:
            return
        (module,) = named
        self.logits_module = resolve_submodule(self.pl_module, module, "logits_module")
        self.logits_name = module if isinstance(module, str) else None

    def _discover_logits_module(self, batch: Any, interface: ModelInterface) -> None:
        """Find the logits module (:mod:`lightning_incremental.core.classifier`): the outermost producer."""
        with self.trainer.precision_plugin.forward_context():
            self.logits_name, self.logits_module, _ = logits_producers(self.pl_module, batch, interface)[-1]

    @contextmanager
    def recording(self, record: "_Record", batch: Any, interface: ModelInterface) -> Iterator[None]:
        """Record the logits module's outputs while the user's step runs."""
        if self.logits_module is None:
            self._discover_logits_module(batch, interface)
        assert self.logits_module is not None
        handle = self.logits_module.register_forward_hook(lambda _m, _i, out: record.outputs.append(out))
        try:
            yield
        finally:
            handle.remove()

    def extra_forward_logits(self, batch: Any, interface: ModelInterface) -> Tensor:
        if not self._warned_extra_forward:
            warnings.warn(
                f"The logits module {self.logits_name or type(self.logits_module).__name__!r} did not run during "
                "training_step (a torch.compile-d model runs a graph that skips forward hooks): the methods get the "
                "logits from one extra forward of the batch per step.",
                stacklevel=2,
            )
            self._warned_extra_forward = True
        with self.trainer.precision_plugin.forward_context():
            return interface.predict(self.pl_module, batch)


class Step:
    """The rest of the chain as one method sees it: call it with a batch to run the inner methods and the user's
    ``training_step``; afterwards :meth:`logits_for` gives the model's logits for the rows of a batch."""

    def __init__(self, chain: StepChain, callbacks: list["ContinualCallback"], position: int, record: "_Record"):
        self.chain, self.callbacks, self.position, self.record = chain, callbacks, position, record

    def __call__(self, batch: Any) -> STEP_OUTPUT:
        if self.position == len(self.callbacks):
            return self._user_step(batch)
        inner = Step(self.chain, self.callbacks, self.position + 1, self.record)
        return self.callbacks[self.position].wrap_training_step(self.chain.trainer, self.chain.pl_module, batch, inner)

    def _user_step(self, batch: Any) -> STEP_OUTPUT:
        args, kwargs = self.chain._step_args
        self.record.batch = batch
        if not self.record.needed:
            return self.chain.original(batch, *args, **kwargs)
        interface = self.record.interface = self._interface()
        with self.chain.recording(self.record, batch, interface):
            return self.chain.original(batch, *args, **kwargs)

    def _interface(self) -> ModelInterface:
        readers = [cb for cb in self.callbacks if cb.reads_step_outputs]
        return interface_of(self.chain.pl_module, readers[0].model_interface if readers else None)

    def logits_for(self, batch: Any) -> Tensor:
        """The model's logits, this step, for the rows of ``batch`` (the batch this method passed in)."""
        record = self.record
        if not record.needed:
            raise RuntimeError(
                f"{type(self.callbacks[self.position - 1]).__name__} reads the step's logits but does not declare "
                "`reads_step_outputs = True`."
            )
        if not record.outputs:
            record.outputs.append(self.chain.extra_forward_logits(record.batch, record.interface))
        logits = record.interface.logits(record.outputs[-1])
        return logits[: batch_size_of(batch)]

    def user_loss(self, batch: Any) -> Tensor | None:
        """The user's own loss on ``batch``: see :meth:`StepChain.user_loss`."""
        return self.chain.user_loss(batch)


class _Record:
    """What the user's step produced: the logits module's outputs and the batch it saw."""

    def __init__(self, needed: bool) -> None:
        self.needed = needed
        self.outputs: list[Any] = []
        self.batch: Any = None
        self.interface = ModelInterface()


@contextmanager
def _muted_logging(pl_module: LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside the block (restored after)."""
    patched = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, attribute in patched.items():
            if attribute is None:
                del pl_module.__dict__[name]
            else:
                pl_module.__dict__[name] = attribute


def add_to_loss(output: STEP_OUTPUT, term: Tensor) -> STEP_OUTPUT:
    """Add ``term`` to the loss of a training-step output (a tensor or a dict with ``"loss"``).

    A ``None`` output (the user skipped the batch) stays ``None``.

    >>> import torch
    >>> add_to_loss(torch.tensor(1.0), torch.tensor(0.5))
    tensor(1.5000)
    >>> add_to_loss({"loss": torch.tensor(1.0), "acc": 0.9}, torch.tensor(2.0))["loss"]
    tensor(3.)
    """
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output + term
    if isinstance(output, dict) and "loss" in output:
        return {**output, "loss": output["loss"] + term}
    raise TypeError(
        f"training_step returned a {type(output).__name__}; continual methods need a loss tensor or a dict "
        "with a 'loss' key."
    )
