"""Putting :class:`~lightning_incremental.methods.partial.LowRankAdapters` into a model and finding them again: the
candidate linear layers, the forward hook that adds the adapters' output, and the bridge to PEFT's own LoRA layers
(PEFT is never imported unless something already loaded it)."""

import sys
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from lightning_incremental.core.selection import Pattern, matching
from lightning_incremental.methods.partial.lora_layer import LowRankAdapters, kaiming_uniform_


# ---------------------------------------------------------------------------------------------- LoRA's own adapters
def linear_types(types: type[nn.Module] | Sequence[type[nn.Module]]) -> tuple[type[nn.Linear], ...]:
    """``module_types`` as a tuple, checked: ``nn.Linear`` and its subclasses only.

    >>> linear_types(nn.Linear)
    (<class 'torch.nn.modules.linear.Linear'>,)
    """
    types = (types,) if isinstance(types, type) else tuple(types)
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, nn.Linear)):
            raise TypeError(
                f"`module_types` takes linear layer types, nn.Linear or its subclasses; got "
                f"{getattr(kind, '__name__', repr(kind))}, which LoRA "
                "cannot adapt (it adds B A x to y = W x + b). Choose layers by name with `target_modules`, or use "
                "PEFT (LoraConfig) for other layer types and pass LoRA() the PEFT model."
            )
    return types


def linear_candidates(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The linear layers adapters can go on: not inside adapters, not an attention's unused ``out_proj``.

    >>> [name for name, _ in linear_candidates(nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(2, 1)))]
    ['0']
    """
    skipped: list[str] = []
    for name, child in module.named_modules():
        if any(name == prefix or name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(child, LowRankAdapters):
            skipped.append(name)
        elif isinstance(child, nn.MultiheadAttention):
            skipped.append(f"{name}.out_proj" if name else "out_proj")
        elif isinstance(child, nn.Linear):
            yield name, child


def inject_adapters(
    module: nn.Module,
    target_modules: tuple[Pattern, ...],
    module_types: tuple[type[nn.Linear], ...],
    *,
    rank: int,
    alpha: float,
    dropout: float,
    generator: torch.Generator,
) -> list[str]:
    """Attach one fresh set of :class:`LowRankAdapters` (``A`` drawn with ``generator``) as ``layer.lora`` to every
    linear layer that ``target_modules`` names or that has one of ``module_types``, with a forward hook that adds
    their output to the layer's; a layer that has them already is left alone. Returns the chosen layers' names.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> inject_adapters(net, ("0",), (), rank=2, alpha=2.0, dropout=0.0, generator=torch.Generator())
    ['0']
    >>> list(own_adapters(net))
    ['0']
    """
    model = type(module).__name__
    candidates = dict(linear_candidates(module))
    if not (target_modules or module_types):
        raise ValueError(
            f"LoRA needs the layers to adapt: `target_modules=[...]` (name patterns) or `module_types=nn.Linear`; "
            f"the linear layers of {model} are: {', '.join(candidates) or 'none'}."
        )
    chosen = matching("target_modules", target_modules, candidates, model, noun="linear layer", suffixes=True)
    for kind in module_types:
        found = {name for name, layer in candidates.items() if isinstance(layer, kind)}
        if not found:
            raise ValueError(
                f"`module_types`: {model} has no {kind.__name__} to adapt; its linear layers are: "
                + ", ".join(f"{name} ({type(layer).__name__})" for name, layer in candidates.items())
                + "."
            )
        chosen |= found
    names = [name for name in candidates if name in chosen]
    for name in names:
        layer = candidates[name]
        if isinstance(layer._modules.get("lora"), LowRankAdapters):
            continue
        if "lora" in layer._modules or hasattr(layer, "lora"):
            raise ValueError(f"{name} already has an attribute `lora`; LoRA cannot attach its adapters there.")
        adapters = LowRankAdapters(layer.in_features, layer.out_features, rank, alpha, dropout)
        adapters.add(generator, layer.weight)
        layer.lora = adapters
        layer.register_forward_hook(_add_adapter_output)
    return names


def _add_adapter_output(layer: nn.Module, args: tuple, output: Tensor) -> Tensor:
    """The forward hook on an adapted layer: add its adapters' output (module-level, so a deepcopy uses its own)."""
    return output + layer.lora(args[0]).to(output.dtype)


def own_adapters(module: nn.Module) -> dict[str, tuple[nn.Linear, LowRankAdapters]]:
    """The adapted layers of ``module`` with their adapters, by the layer's name."""
    return {
        name: (layer, layer._modules["lora"])
        for name, layer in module.named_modules()
        if isinstance(layer._modules.get("lora"), LowRankAdapters)
    }


# ---------------------------------------------------------------------------------------------- PEFT's LoRA layers
def peft_lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """PEFT's LoRA layers in ``module``, by name; PEFT is looked at only if something already imported it."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


def peft_trainable(module: nn.Module) -> list[nn.Parameter]:
    """PEFT's active adapters, and what PEFT left trainable inside a ``PeftModel`` (its ``modules_to_save``)."""
    layers = peft_lora_layers(module)
    if not layers:
        return []
    from peft import PeftModel

    params = [
        p
        for layer in layers.values()
        for adapter in layer.active_adapters
        for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters())
    ]
    params += [p for m in module.modules() if isinstance(m, PeftModel) for p in m.parameters() if p.requires_grad]
    return params


def check_peft(module: nn.Module, layers: dict[str, nn.Module], *, chooses_layers: bool, mode: str) -> None:
    """Refuse, with the fix, what LoRA cannot do with the PEFT LoRA ``layers`` of ``module``: choose layers itself
    (``chooses_layers``: ``target_modules`` or ``module_types`` given), ``mode="per_task"``, a variant (DoRA, …)."""
    if chooses_layers:
        raise ValueError(
            f"{type(module).__name__} already has PEFT LoRA layers ({', '.join(list(layers)[:4])}, …); LoRA "
            "trains those and injects none: leave out `target_modules` and `module_types` (PEFT's LoraConfig "
            "chose the layers)."
        )
    if mode == "per_task":
        raise ValueError(
            "`mode='per_task'` injects one adapter set per task, which a PEFT model's LoRA layers do not hold: "
            "use mode='merge' with the PEFT model, or LoRA's own adapters on the model without PEFT."
        )
    for name, layer in layers.items():
        for adapter in layer.active_adapters:
            variant = getattr(layer, "lora_variant", {}).get(adapter) or getattr(layer, "use_dora", {}).get(adapter)
            if adapter not in layer.lora_A or variant:
                raise ValueError(
                    f"PEFT adapter {adapter!r} of {name} is not a plain LoRA of a linear or convolutional layer "
                    f"({type(layer).__name__}{', a variant such as DoRA' if variant else ''}); LoRA merges and "
                    "re-draws plain LoRA only: configure PEFT without it, or let PEFT merge it yourself."
                )


@torch.no_grad()
def merge_peft_adapters(layers: dict[str, nn.Module], generator: torch.Generator) -> None:
    """Merge the active adapters of PEFT's LoRA ``layers`` into their base weights with PEFT's own ``merge``, and
    re-draw them fresh (``A`` with ``generator``, ``B = 0``) for the next task."""
    for layer in layers.values():
        for name in layer.active_adapters:
            layer.merge(adapter_names=[name])  # PEFT's own merge: W += its delta weight
            layer.merged_adapters.remove(name)  # the delta is the base weight's now, not an adapter's
            kaiming_uniform_(layer.lora_A[name].weight, generator)
            for param in layer.lora_B[name].parameters():
                param.zero_()
