"""The conformance suite on two more kinds of model: the reference regression MLP on a drifting stream, and a
Hugging Face ``BertForSequenceClassification`` (tiny config, random init, nothing downloaded) on dict batches whose
sequence lengths vary. Every cataloged method runs on each where it makes sense (32-true, bf16-mixed, gradient
accumulation, a mid-task resume) and refuses with a clear error where it does not."""

import lightning as L
import pytest
import torch
from harness import QUIET
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset
from torchmetrics import MeanSquaredError

from lightning_incremental import AGEM, DER, EWC, MAS, SI, ContinualEvaluation, ExperienceReplay, LwF
from lightning_incremental.catalog import registry
from lightning_incremental.models import MLPRegressor
from lightning_incremental.scenarios import regression_stream, split_classes

# the methods that cannot serve this model, and the fix their error names
REGRESSION_REFUSES = {"icarl": "class labels", "ranpac": "head_module=", "prototype": "head_module="}
SETTINGS = {"32-true": {}, "bf16-mixed": {"precision": "bf16-mixed"}, "accumulate-2": {"accumulate_grad_batches": 2}}


# ---------------------------------------------------------------------------------------------- regression
@pytest.fixture(scope="module")
def drifting_stream():
    return regression_stream(n_tasks=3, train_per_task=96, test_per_task=64)


def _fit_regression(spec, stream, epochs=2, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    model, methods = MLPRegressor(), spec.callbacks()
    evaluation = ContinualEvaluation(stream, metric=MeanSquaredError())
    for task in stream.cumulative() if spec.cumulative else stream:
        fit = L.Trainer(max_epochs=epochs, callbacks=[*methods, evaluation], **{**QUIET, **trainer_kwargs})
        fit.fit(model, task.train_dataloader(batch_size=16, shuffle=False))
    return model, evaluation


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(registry()))
def test_every_method_on_the_regression_stream(name, setting, drifting_stream):
    spec = registry()[name]
    if name in REGRESSION_REFUSES:
        with pytest.raises((ValueError, TypeError), match=REGRESSION_REFUSES[name]):
            _fit_regression(spec, drifting_stream, **SETTINGS[setting])
        return
    model, evaluation = _fit_regression(spec, drifting_stream, **SETTINGS[setting])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    final = evaluation.result().matrix[-1]
    assert len(final) == 3 and all(0.0 <= mse < 2.0 for mse in final), final


# ---------------------------------------------------------------------------------------------- a tiny BERT
transformers = pytest.importorskip("transformers")

VOCAB, CLASSES = 40, 10


class TokenSequences(Dataset):
    """Class ``c`` draws its tokens mostly from its own four ids (the first always); lengths vary from 4 to 16."""

    def __init__(self, per_class: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.items, labels = [], []
        for label in range(CLASSES):
            for _ in range(per_class):
                length = int(torch.randint(4, 17, (1,), generator=generator))
                own = 4 * label + torch.randint(0, 4, (length,), generator=generator)
                noise = torch.randint(0, VOCAB, (length,), generator=generator)
                ids = torch.where(torch.rand(length, generator=generator) < 0.8, own, noise)
                ids[0] = own[0]  # the position BERT's pooler reads holds a token of the class
                self.items.append({"input_ids": ids + 1, "labels": torch.tensor(label)})  # id 0 is padding
                labels.append(label)
        self.targets = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def pad_collate(items: list[dict]) -> dict:
    """Pad to the longest row of the batch: ids with 0, the attention mask with 0."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item["input_ids"])] = item["input_ids"]
        mask[row, : len(item["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([item["labels"] for item in items])}


class TinyBert(L.LightningModule):
    """The usual Lightning NLP module: dict batches, ``self.model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB + 1,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            num_labels=CLASSES,
            initializer_range=0.2,  # a random init that learns in a few dozen steps
            hidden_dropout_prob=0.0,  # no dropout: a resumed run is bit-comparable (the global RNG is not checkpointed)
            attention_probs_dropout_prob=0.0,
        )
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def text_stream():
    return split_classes(TokenSequences(40, seed=0), TokenSequences(12, seed=1), n_tasks=5)


def _fit_text(methods, stream, epochs=4, **trainer_kwargs):
    L.seed_everything(0, verbose=False)
    model = TinyBert()
    evaluation = ContinualEvaluation(stream, collate_fn=pad_collate)
    for task in stream:
        fit = L.Trainer(max_epochs=epochs, callbacks=[*methods, evaluation], **{**QUIET, **trainer_kwargs})
        fit.fit(model, task.train_dataloader(batch_size=16, shuffle=True, collate_fn=pad_collate))
    return model, evaluation


TEXT_METHODS = {
    "replay": lambda: ExperienceReplay(buffer_size=60),
    "der": lambda: DER(buffer_size=60),
    "derpp": lambda: DER(buffer_size=60, alpha=0.3, beta=1.0),
    "agem": lambda: AGEM(buffer_size=60),
    "lwf": LwF,
    "ewc": EWC,
    "si": SI,
    "mas": MAS,
}


@pytest.mark.parametrize("setting", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(TEXT_METHODS))
def test_every_method_on_dict_batches_of_varying_length(name, setting, text_stream):
    model, evaluation = _fit_text([TEXT_METHODS[name]()], text_stream, epochs=1, **SETTINGS[setting])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(evaluation.result().matrix) == 5


def test_replay_beats_naive_fine_tuning_on_the_text_stream_by_twenty_points(text_stream):
    _, naive = _fit_text([], text_stream, epochs=8)
    _, replay = _fit_text([ExperienceReplay(buffer_size=100)], text_stream, epochs=8)
    learnt = [naive.result().matrix[t][t] for t in range(5)]
    assert min(learnt) >= 0.9, f"the tiny model must learn each task: {learnt}"
    assert replay.result().summary()["acc"] >= naive.result().summary()["acc"] + 0.20


class _Crash(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise KeyError("simulated crash")


@pytest.mark.parametrize("name", list(TEXT_METHODS))
def test_a_mid_task_resume_on_dict_batches_matches_the_uninterrupted_run(name, text_stream, tmp_path):
    def run(crash: bool) -> dict:
        L.seed_everything(0, verbose=False)
        model, methods = TinyBert(), [TEXT_METHODS[name]()]
        tasks = list(text_stream)[:2]
        for index, task in enumerate(tasks):
            loader = task.train_dataloader(batch_size=16, shuffle=False, collate_fn=pad_collate)
            last = index == len(tasks) - 1
            if crash and last:
                checkpoint = ModelCheckpoint(tmp_path, "{epoch}", save_top_k=-1, save_on_train_epoch_end=True)
                fit = L.Trainer(
                    max_epochs=2, callbacks=[*methods, checkpoint, _Crash()], **{**QUIET, "enable_checkpointing": True}
                )
                with pytest.raises(KeyError):
                    fit.fit(model, loader)
                methods = [TEXT_METHODS[name]()]  # a new process: fresh instances, state from the checkpoint
                resumed = L.Trainer(max_epochs=2, callbacks=methods, **QUIET)
                resumed.fit(model, loader, ckpt_path=tmp_path / "epoch=0.ckpt")
            else:
                L.Trainer(max_epochs=2, callbacks=methods, **QUIET).fit(model, loader)
        return {k: v.clone() for k, v in model.state_dict().items()}

    uninterrupted, resumed = run(False), run(True)
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-5, rtol=0, msg=key)
