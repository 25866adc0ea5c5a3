"""Training rows for a causal language model, and scoring its answers for
:class:`~lightning_incremental.ContinualEvaluation`: by the likelihood of candidate answers, or by the exact match of
a greedy generation.

A training item is a prompt and its answer, with the loss on the answer only (:func:`instruction_item`); a batch pads
them on the right (:func:`collate_instructions`), so that ``self.model(**batch).loss`` is the answer's loss.

A test item is a prompt, ``K`` candidate answers and the index of the right one (:func:`candidate_item`); a batch
stacks them as ``[B, K, T]`` token ids (:func:`collate_candidates`). :class:`CandidateLikelihood` scores each
candidate by the log-likelihood the model gives its tokens after the prompt, in one forward of the ``B * K`` rows,
and returns the ``[B, K]`` scores: the evaluation's accuracy over ``K`` classes is then the share of items whose
right answer scores highest. Deterministic (no sampling) and batched; the model is read through the
:class:`~lightning_incremental.ModelInterface`, so a LightningModule that wraps a Hugging Face causal LM as
``self.model`` works as it is::

    ContinualEvaluation(stream, predict=CandidateLikelihood(), num_classes=K, collate_fn=collate_candidates)

A generation test item is a prompt and its reference answer (:func:`generation_item`); :class:`GreedyExactMatch`
generates greedily (the model's own ``generate``, prompts left-padded by :func:`collate_generation`) as many tokens as
the longest reference, and torchmetrics' ``MulticlassExactMatch`` over the vocabulary (``ignore_index=-100``) counts
the answers generated exactly::

    ContinualEvaluation(stream, predict=GreedyExactMatch(), metric=MulticlassExactMatch(vocab_size,
                        ignore_index=-100), collate_fn=collate_generation)
"""

from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.nn import functional as F

from lightning_incremental.core import (
    IGNORE_INDEX,
    ModelInterface,
    check_interface_argument,
    interface_of,
    model_within,
)


def instruction_item(prompt: Sequence[int], answer: Sequence[int]) -> dict[str, list[int]]:
    """One training item: the prompt's and the answer's token ids, labelled on the answer only (-100 on the prompt).

    >>> instruction_item([5, 6], [7, 2])
    {'input_ids': [5, 6, 7, 2], 'labels': [-100, -100, 7, 2]}
    """
    if not answer:
        raise ValueError("The answer needs at least one token: the loss is on the answer only.")
    return {"input_ids": [*prompt, *answer], "labels": [IGNORE_INDEX] * len(prompt) + list(answer)}


def collate_instructions(items: Sequence[dict[str, Sequence[int]]], pad_id: int = 0) -> dict[str, Tensor]:
    """Items of :func:`instruction_item` (or any ``{"input_ids", "labels"}`` rows) as a batch padded on the right
    to its longest row: ``input_ids`` (``pad_id``), ``attention_mask`` (0) and ``labels`` (-100), ``[B, T]``.

    >>> batch = collate_instructions([instruction_item([5], [7, 2]), instruction_item([5, 6], [8])])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 7, 2], [5, 6, 8]], [[1, 1, 1], [1, 1, 1]], [[-100, 7, 2], [-100, -100, 8]])
    """
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, item in enumerate(items):
        if len(item["labels"]) != len(item["input_ids"]):
            raise ValueError(f"Item {row} has {len(item['input_ids'])} input ids but {len(item['labels'])} labels.")
        size = len(item["input_ids"])
        input_ids[row, :size] = torch.tensor(item["input_ids"])
        labels[row, :size] = torch.tensor(item["labels"])
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


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
        rows = {key: batch[key].flatten(0, 1) for key in ("input_ids", "attention_mask", "labels")}
        interface = interface_of(pl_module, self.model_interface)
        with torch.no_grad():  # the model's own loss per row: the mean over the candidate's tokens
            scores = -interface.per_sample_loss(interface.predict(pl_module, rows), rows)
        if self.reduction == "sum":
            labels = rows["labels"][:, 1:] if interface.shifts_labels else rows["labels"]
            scores = scores * (labels != IGNORE_INDEX).sum(-1)
        return scores.view(items, candidates)


def generation_item(prompt: Sequence[int], answer: Sequence[int]) -> dict[str, Any]:
    """One generation test item: the prompt's token ids and the reference answer's.

    >>> generation_item([5, 6], [7, 3])
    {'input_ids': [5, 6], 'label': [7, 3]}
    """
    if not answer:
        raise ValueError("The reference answer needs at least one token.")
    return {"input_ids": list(prompt), "label": list(answer)}


def collate_generation(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Items of :func:`generation_item` as a batch: the prompts left-padded with ``pad_id`` (generation continues
    every row from its last position), their ``attention_mask``, and the references ``label`` ``[B, A]`` right-padded
    with -100.

    >>> batch = collate_generation([generation_item([5, 6], [7]), generation_item([8], [9, 3])])
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["label"].tolist()
    ([[5, 6], [0, 8]], [[1, 1], [0, 1]], [[7, -100], [9, 3]])
    """
    prompt_length = max(len(item["input_ids"]) for item in items)
    answer_length = max(len(item["label"]) for item in items)
    input_ids = torch.full((len(items), prompt_length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    label = torch.full((len(items), answer_length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        prompt, answer = item["input_ids"], item["label"]
        input_ids[row, prompt_length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, prompt_length - len(prompt) :] = 1
        label[row, : len(answer)] = torch.tensor(answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "label": label}


class GreedyExactMatch:
    """``predict`` for :class:`~lightning_incremental.ContinualEvaluation`: the tokens a Hugging Face causal LM
    generates greedily after each prompt, ``[B, A]`` for references of up to ``A`` tokens (padded with ``pad_id`` past
    an end of sequence). Deterministic (no sampling) and batched.

    Args:
        pad_id: the id generation pads with (the tokenizer's pad id, else its end-of-sequence id).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        ...                      num_attention_heads=2, num_key_value_heads=2)
        >>> batch = collate_generation([generation_item([1, 2], [3, 4, 5]), generation_item([6], [7])])
        >>> GreedyExactMatch()(LlamaForCausalLM(config).eval(), batch).shape
        torch.Size([2, 3])
    """

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = pad_id

    def __call__(self, pl_module: LightningModule, batch: dict[str, Tensor]) -> Tensor:
        """The generated tokens of a :func:`collate_generation` batch, as long as its references."""
        model = model_within(pl_module)
        if not hasattr(model, "generate"):
            raise TypeError(
                f"GreedyExactMatch generates with the model's own `generate` (a Hugging Face causal LM), and "
                f"{type(model).__name__} has none. Score candidate answers with CandidateLikelihood instead."
            )
        prompt_length, answer_length = batch["input_ids"].shape[1], batch["label"].shape[1]
        with torch.no_grad():
            generated = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=answer_length,
                min_new_tokens=answer_length,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        new = generated[:, prompt_length:]
        return F.pad(new, (0, answer_length - new.shape[1]), value=self.pad_id)
