"""Scoring a language model's answers for :class:`~lightning_incremental.ContinualEvaluation`: by the likelihood of
candidate answers.

A test item is a prompt, ``K`` candidate answers and the index of the right one (:func:`candidate_item`); a batch
stacks them as ``[B, K, T]`` token ids (:func:`collate_candidates`). :class:`CandidateLikelihood` scores each
candidate by the log-likelihood the model gives its tokens after the prompt, in one forward of the ``B * K`` rows,
and returns the ``[B, K]`` scores: the evaluation's accuracy over ``K`` classes is then the share of items whose
right answer scores highest. Deterministic (no sampling) and batched; the model is read through the
:class:`~lightning_incremental.ModelInterface`, so a LightningModule that wraps a Hugging Face causal LM as
``self.model`` works as it is::

    ContinualEvaluation(stream, predict=CandidateLikelihood(), num_classes=K, collate_fn=collate_candidates)
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn import functional as F

from lightning_incremental.core import IGNORE_INDEX, ModelInterface, check_interface_argument, interface_of


def candidate_item(prompt: Sequence[int], candidates: Sequence[Sequence[int]], answer: int) -> dict[str, Any]:
    """One test item: every candidate's token ids after the prompt's, labelled on the candidate's tokens only.

    >>> item = candidate_item([5, 6], [[7], [8, 9]], answer=1)
    >>> item["input_ids"], item["labels"], item["label"]
    ([[5, 6, 7], [5, 6, 8, 9]], [[-100, -100, 7], [-100, -100, 8, 9]], 1)
    """
    if not 0 <= answer < len(candidates):
        raise ValueError(f"`answer` must index one of the {len(candidates)} candidates, got {answer}.")
    if any(len(candidate) == 0 for candidate in candidates):
        raise ValueError("Every candidate needs at least one token: an empty one would score 0 and could win.")
    return {
        "input_ids": [[*prompt, *candidate] for candidate in candidates],
        "labels": [[IGNORE_INDEX] * len(prompt) + list(candidate) for candidate in candidates],
        "label": answer,
    }


def collate_candidates(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Items of :func:`candidate_item` as a batch: ``input_ids``, ``attention_mask`` and ``labels`` ``[B, K, T]``
    (right-padded with ``pad_id``, 0 and -100), ``label`` ``[B]``.

    >>> batch = collate_candidates([candidate_item([5], [[7], [8, 9]], 0)])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["label"].tolist()
    ([[[5, 7, 0], [5, 8, 9]]], [[[1, 1, 0], [1, 1, 1]]], [0])
    """
    counts = {len(item["input_ids"]) for item in items}
    if len(counts) != 1:
        raise ValueError(f"Every item of a batch needs the same number of candidates, got {sorted(counts)}.")
    length = max(len(row) for item in items for row in item["input_ids"])
    shape = (len(items), counts.pop(), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for i, item in enumerate(items):
        for k, (row, row_labels) in enumerate(zip(item["input_ids"], item["labels"], strict=True)):
            input_ids[i, k, : len(row)] = torch.tensor(row)
            labels[i, k, : len(row)] = torch.tensor(row_labels)
            attention_mask[i, k, : len(row)] = 1
    label = torch.tensor([item["label"] for item in items])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "label": label}


class CandidateLikelihood:
    """``predict`` for :class:`~lightning_incremental.ContinualEvaluation`: each candidate's log-likelihood.

    Args:
        reduction: ``"sum"`` (the candidate's log-probability) or ``"mean"`` (per token, which does not favour
            short candidates).
        model_interface: how to call the model; default: the model's ``continual_interface``, else the default
            (a LightningModule without ``forward`` is called through the model it wraps; a causal LM's logits at
            ``t`` score the token at ``t + 1``).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> batch = collate_candidates([candidate_item([1, 2], [[3], [4, 5], [6]], answer=2)])
        >>> CandidateLikelihood()(LlamaForCausalLM(config).eval(), batch).shape
        torch.Size([1, 3])
    """

    def __init__(self, reduction: Literal["sum", "mean"] = "sum", model_interface: ModelInterface | None = None):
        if reduction not in ("sum", "mean"):
            raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
        self.reduction = reduction
        self.model_interface = check_interface_argument(model_interface)

    def __call__(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor:
        """The ``[B, K]`` scores of the candidates of a :func:`collate_candidates` batch."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in batch or batch[key].ndim != 3:
                raise ValueError(
                    f"CandidateLikelihood needs `{key}` of shape [batch, candidates, tokens]: build the test items "
                    "with `candidate_item` and batch them with `collate_candidates` (ContinualEvaluation's "
                    "`collate_fn`)."
                )
        items, candidates, _ = batch["input_ids"].shape
        rows = {key: batch[key].flatten(0, 1) for key in ("input_ids", "attention_mask")}
        interface = interface_of(pl_module, self.model_interface)
        with torch.no_grad():
            logits = interface.predict(pl_module, rows).float()
        labels = batch["labels"].flatten(0, 1)
        if interface.is_causal(pl_module):
            logits, labels = logits[:, :-1], labels[:, 1:]  # position t scores the token at t + 1
        scored = labels != IGNORE_INDEX
        log_probs = F.log_softmax(logits, dim=-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        totals = (log_probs * scored).sum(-1)
        if self.reduction == "mean":
            totals = totals / scored.sum(-1).clamp_min(1)
        return totals.view(items, candidates)
