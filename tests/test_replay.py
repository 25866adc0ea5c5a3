"""The replay buffer and the replay methods: what enters the buffer, what the training step sees, the
statistics of the policies, checkpoints bit for bit, one global buffer over DDP ranks, and argument errors."""

import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from harness import assert_same_state, run_like_torchrun, tiny_model, train_loader, trainer
from torch.nn import functional as F

from lightning_incremental import KeepOptimizerState, load_task_checkpoint
from lightning_incremental.buffers import ReplayBuffer
from lightning_incremental.methods.replay import AGEM, DER, ExperienceReplay
from lightning_incremental.methods.replay._base import ReplayMethod
from lightning_incremental.methods.replay.agem import project_conflicting
from lightning_incremental.models import MLPClassifier


def _chi2_survival(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square(df): the regularized upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


# ---------------------------------------------------------------------------------------------- the buffer
def test_reservoir_keeps_every_row_of_the_stream_with_the_same_probability():
    stream_length, capacity, trials = 500, 50, 300
    counts = torch.zeros(stream_length)
    for trial in range(trials):
        buffer = ReplayBuffer(capacity, seed=trial)
        for start in range(0, stream_length, 25):
            buffer.add([torch.arange(start, start + 25)], groups=None)
        assert len(buffer) == capacity and buffer.seen == stream_length
        kept = buffer.storage[0]
        assert kept.unique().numel() == capacity  # no row twice
        counts[kept] += 1
    p = capacity / stream_length
    expected, variance = trials * p, trials * p * (1 - p)  # each row's count is Binomial(trials, p)
    statistic = float(((counts - expected) ** 2 / variance).sum())
    assert _chi2_survival(statistic, stream_length - 1) > 1e-3, f"chi-square {statistic:.0f} on 499 dof"
    early, late = counts[:100].mean(), counts[-100:].mean()  # no drift towards old or new rows
    assert abs(early - late) < 0.1 * expected


def test_class_balanced_policy_equalises_the_classes_of_an_imbalanced_stream():
    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(300), torch.ones(100), torch.full((40,), 2)]).long()
    labels = labels[torch.randperm(len(labels), generator=generator)]
    buffer = ReplayBuffer(60, policy="class_balanced", seed=0)
    for rows in labels.split(16):
        buffer.add([torch.randn(len(rows), 3), rows], groups=rows)
    assert torch.bincount(buffer.storage[1], minlength=3).tolist() == [20, 20, 20]
    # a class with fewer rows than its share keeps all of them; the others share the rest equally
    rare = ReplayBuffer(60, policy="class_balanced", seed=0)
    labels = torch.cat([torch.zeros(300), torch.ones(100), torch.full((10,), 2)]).long()
    for rows in labels[torch.randperm(len(labels), generator=generator)].split(16):
        rare.add([rows], groups=rows)
    assert torch.bincount(rare.storage[0], minlength=3).tolist() == [25, 25, 10]


def test_buffer_keeps_the_input_dtype_and_reports_its_memory():
    buffer = ReplayBuffer(10)
    images, labels = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), torch.arange(4)
    buffer.add([images, labels], groups=None, extras={"logits": torch.randn(4, 5)})
    assert [t.dtype for t in buffer.storage] == [torch.uint8, torch.int64]
    assert buffer.nbytes == 10 * 64 * 1 + 10 * 8 + 10 * 5 * 4 + 10 * 8  # rows, logits, each slot's group
    rows, extras, index, _ = buffer.sample(6)
    torch.testing.assert_close(rows[0], buffer.storage[0][index])
    assert extras["logits"].shape == (6, 5)


def test_buffer_state_round_trip_is_bit_for_bit_including_the_generator():
    buffer = ReplayBuffer(30, policy="class_balanced", seed=3)
    for _ in range(10):
        labels = torch.arange(8) % 3
        buffer.add([torch.randn(8, 4), labels], groups=labels, extras={"logits": torch.randn(8, 3)})
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(30, policy="class_balanced", seed=99)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert_same_state(restored.state_dict(), buffer.state_dict())
    for a, b in zip(restored.sample(16), buffer.sample(16), strict=True):  # the same draws afterwards
        assert_same_state(a, b)
    labels = torch.tensor([0, 1, 2])
    buffer.add([torch.ones(3, 4), labels], labels, {"logits": torch.ones(3, 3)})
    restored.add([torch.ones(3, 4), labels], labels, {"logits": torch.ones(3, 3)})
    assert_same_state(restored.state_dict(), buffer.state_dict())


def test_pooled_shards_and_shares_partition_the_rows():
    shards = []
    for rank in range(2):
        shard = ReplayBuffer(10, seed=rank)
        shard.add([torch.arange(100 * rank, 100 * rank + 30)], groups=None)
        shards.append(shard.state_dict())
    pooled = ReplayBuffer.pooled(shards, capacity=20)
    assert len(pooled) == 20 and pooled.seen == 60
    assert sorted(pooled.storage[0].tolist()) == sorted(
        shards[0]["storage"][0].tolist() + shards[1]["storage"][0].tolist()
    )
    shares = [pooled.share(rank, 3, seed=0) for rank in range(3)]
    assert [len(s) for s in shares] == [7, 7, 6]
    assert sorted(torch.cat([s.storage[0] for s in shares]).tolist()) == sorted(pooled.storage[0].tolist())


# ---------------------------------------------------------------------------------------------- the methods
class _RecordingClassifier(MLPClassifier):
    """Records the structure, size and dtypes of every batch its training_step receives."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[type, int, list[torch.dtype]]] = []

    def training_step(self, batch, batch_idx):
        leaves = list(batch.values()) if isinstance(batch, dict) else list(batch)
        self.seen.append((type(batch), len(leaves[0]), [t.dtype for t in leaves]))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("style", ["tuple", "list", "dict"])
def test_experience_replay_extends_the_batch_and_keeps_its_structure(style, split_stream):
    L.seed_everything(0, verbose=False)
    model = _RecordingClassifier(16, 6, hidden=(8,))
    replay = ExperienceReplay(buffer_size=20, ratio=0.5, fill="stream")
    trainer(1, [replay]).fit(model, train_loader(split_stream[0], style))
    kinds = {kind for kind, _, _ in model.seen}
    assert kinds == {dict if style == "dict" else tuple if style == "tuple" else list}
    assert [size for _, size, _ in model.seen[:3]] == [8, 12, 12]  # the first batch finds the buffer empty
    assert {tuple(dtypes) for _, _, dtypes in model.seen} == {(torch.float32, torch.int64)}
    with pytest.raises(RuntimeError, match="same structure"):
        other = torch.utils.data.DataLoader(
            split_stream[1].train,
            batch_size=8,
            collate_fn=lambda items: (
                torch.stack([x for x, _ in items]),
                torch.tensor([y for _, y in items]),
                torch.zeros(len(items)),
            ),
        )
        trainer(1, [replay]).fit(model, other)


def test_replay_batch_size_fixes_the_replayed_rows(split_stream):
    model = _RecordingClassifier(16, 6, hidden=(8,))
    replay = ExperienceReplay(buffer_size=20, replay_batch_size=3, fill="stream")
    trainer(1, [replay]).fit(model, train_loader(split_stream[0]))
    assert {size for _, size, _ in model.seen[1:]} == {11}


def test_filling_at_task_end_offers_each_row_once_and_balanced_policies_balance_tasks(split_stream):
    model = tiny_model(split_stream)
    replay = ExperienceReplay(buffer_size=30, fill="task_end", policy="task_balanced")
    for task in split_stream:
        trainer(2, [replay]).fit(model, train_loader(task))
    assert replay.buffer.seen == sum(len(task.train) for task in split_stream)  # 2 epochs, offered once
    labels = replay.buffer.storage[1]
    assert torch.bincount(labels // 2, minlength=3).tolist() == [10, 10, 10]  # two classes per task


def test_der_without_its_terms_trains_exactly_like_fine_tuning(split_stream):
    runs = {}
    # DER carries the optimizer's state by default: fine-tuning with it carried is the same training
    for name, callbacks in (("naive", [KeepOptimizerState()]), ("der", [DER(buffer_size=20, alpha=0.0, beta=0.0)])):
        model = tiny_model(split_stream)
        for task in list(split_stream)[:2]:
            trainer(1, callbacks).fit(model, train_loader(task))
        runs[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(runs["der"], runs["naive"], atol=0, rtol=0)


@pytest.mark.parametrize("fill", ["stream", "task_end"])
def test_der_stores_the_logits_the_model_gave_each_row(fill, split_stream):
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(16, 6, hidden=(8,), lr=0.0)  # weights fixed: the logits at insertion are known
    der = DER(buffer_size=200, fill=fill)
    trainer(1, [der]).fit(model, train_loader(split_stream[0]))
    inputs, stored = der.buffer.storage[0][: len(der.buffer)], der.buffer.extras["logits"][: len(der.buffer)]
    assert len(der.buffer) == len(split_stream[0].train)
    torch.testing.assert_close(stored, model(inputs).detach(), atol=1e-6, rtol=1e-5)


def test_der_adds_alpha_times_the_logit_mse_on_replayed_rows(split_stream):
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(16, 6, hidden=(8,), lr=0.0)  # fixed weights: the replayed logits are known
    der = DER(buffer_size=200, alpha=0.5)
    trainer(1, [der]).fit(model, train_loader(split_stream[0]))
    der.buffer.extras["logits"] += 1.0  # every stored logit now 1 away from the model's: the MSE is exactly 1
    der.fill = "task_end"  # keep the shifted rows during the next fit (the buffer is full anyway)
    losses = []

    class _Loss(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer(1, [der, _Loss()]).fit(model, train_loader(split_stream[0]))
    cross_entropy = [float(F.cross_entropy(model(x).detach(), y)) for x, y in train_loader(split_stream[0])]
    assert losses == pytest.approx([ce + 0.5 * 1.0 for ce in cross_entropy], abs=1e-5)


def test_agem_projection_removes_exactly_the_conflicting_component():
    grads = [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])]
    references = [torch.tensor([0.0, 1.0]), torch.tensor([[1.0]])]  # g . r = -2 + 3 = 1 >= 0: untouched
    assert not project_conflicting(grads, references)
    assert grads[0].tolist() == [1.0, -2.0] and grads[1].item() == 3.0
    grads = [torch.tensor([1.0, -4.0]), torch.tensor([[1.0]])]  # g . r = -3, |r|^2 = 2
    assert project_conflicting(grads, references)
    assert grads[0].tolist() == [1.0, -2.5] and grads[1].item() == 2.5
    dot = sum(float((g * r).sum()) for g, r in zip(grads, references, strict=True))
    assert dot == pytest.approx(0.0)


def test_agem_constrains_a_new_task_by_the_memory_of_the_earlier_ones(split_stream):
    model = tiny_model(split_stream)
    agem = AGEM(buffer_size=40, replay_batch_size=16)
    trainer(2, [agem]).fit(model, train_loader(split_stream[0]))
    assert agem.projections == 0  # no memory yet: the first task trains unconstrained
    assert len(agem.buffer) == 40 and set(agem.buffer.storage[1].tolist()) == {0, 1}
    trainer(2, [agem]).fit(model, train_loader(split_stream[1]))
    steps = 2 * len(train_loader(split_stream[1]))
    assert agem.projections >= steps // 2  # the new classes' gradient often raises the old classes' loss


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("build", [lambda: ExperienceReplay(buffer_size=25), lambda: DER(buffer_size=25, beta=0.5)])
def test_a_checkpoint_restores_the_buffer_bit_for_bit(build, split_stream, tmp_path):
    model, method = tiny_model(split_stream), build()
    fit = trainer(1, [method])
    fit.fit(model, train_loader(split_stream[0]))
    fit.save_checkpoint(tmp_path / "task0.ckpt")
    restored = build()
    load_task_checkpoint(tmp_path / "task0.ckpt", tiny_model(split_stream, seed=5), [restored])
    assert_same_state(restored.state_dict(), method.state_dict())
    assert_same_state(restored.buffer.sample(10), method.buffer.sample(10))


# ---------------------------------------------------------------------------------------------- DDP
def test_ddp_ranks_hold_shares_of_one_global_buffer_and_the_checkpoint_holds_all(split_stream, tmp_path):
    def worker(rank: int, out_dir: Path) -> None:
        model, replay = tiny_model(split_stream), ExperienceReplay(buffer_size=40)
        trainer(1, [replay], strategy="ddp", devices=2).fit(model, train_loader(split_stream[0]))
        local = replay.buffer.storage[0][: len(replay.buffer)].clone()
        torch.save({"local": local, "state": replay.state_dict()}, out_dir / f"rank{rank}.pt")

    run_like_torchrun(worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(r["local"]) for r in ranks] == [20, 20]
    assert_same_state(ranks[0]["state"], ranks[1]["state"])  # every rank can write the full checkpoint
    rows = torch.cat([r["local"] for r in ranks])
    assert rows.unique(dim=0).shape[0] == 40  # the ranks trained on different rows: no sample twice

    resumed = ExperienceReplay(buffer_size=40)  # one process now: it gets every row back
    resumed.load_state_dict(ranks[0]["state"])
    kept = resumed.buffer.storage[0][: len(resumed.buffer)]
    assert len(resumed.buffer) == 40
    assert sorted(map(tuple, kept.tolist())) == sorted(map(tuple, rows.tolist()))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ExperienceReplay(buffer_size=0), "buffer_size"),
        (lambda: ExperienceReplay(policy="fifo"), "policy"),
        (lambda: ExperienceReplay(fill="later"), "fill"),
        (lambda: ExperienceReplay(ratio=0), "ratio"),
        (lambda: ExperienceReplay(replay_batch_size=0), "replay_batch_size"),
        (lambda: ExperienceReplay(pad_values={"input_ids": "one"}), "pad_values"),
        (lambda: ExperienceReplay(pad_values=[1]), "pad_values"),
        (lambda: DER(alpha=-1.0), "alpha"),
        (lambda: DER(beta=-0.1), "beta"),
        (lambda: AGEM(replay_batch_size=0), "replay_batch_size"),
    ],
)
def test_bad_arguments_name_the_argument(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_checkpoint_of_another_policy_is_refused_unless_the_policy_is_auto():
    saved = ExperienceReplay(policy="reservoir").state_dict()
    with pytest.raises(ValueError, match=r"saved buffer used policy='reservoir'.*`policy='class_balanced'`"):
        ExperienceReplay(policy="class_balanced").load_state_dict(saved)
    restored = ExperienceReplay(policy="auto")
    restored.load_state_dict(saved)
    assert restored.buffer.policy == "reservoir"


def test_a_balanced_policy_on_unlabelled_batches_says_it_needs_labels(split_stream):
    unlabelled = torch.utils.data.DataLoader(
        split_stream[0].train, batch_size=8, collate_fn=lambda items: torch.stack([x for x, _ in items])
    )

    class _Unsupervised(MLPClassifier):
        def training_step(self, batch, batch_idx):
            return self(batch).square().mean()

    with pytest.raises(ValueError, match=r"ExperienceReplay\(policy='class_balanced'\).*needs the targets"):
        trainer(1, [ExperienceReplay(policy="class_balanced")]).fit(_Unsupervised(16, 6, hidden=(8,)), unlabelled)


# ---------------------------------------------------------------------------------------------- any model, any target
PAD_ID = 1


class _TinyTextModel(L.LightningModule):
    """A Hugging Face-style model: ``model(**inputs)`` returns ``.logits`` and ``.loss``; a sequence classifier over
    the mean of its tokens' embeddings, or a token classifier. Records every batch its training_step receives."""

    def __init__(self, token_level: bool = False, vocab: int = 64, classes: int = 6) -> None:
        super().__init__()
        self.token_level = token_level
        self.embed, self.head = torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, classes)
        self.batches: list[dict[str, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.embed(input_ids)
        if self.token_level:
            logits = self.head(hidden)
            return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
        mask = attention_mask.unsqueeze(-1).float()
        logits = self.head((hidden * mask).sum(1) / mask.sum(1))
        return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits, labels))

    def training_step(self, batch, batch_idx):
        self.batches.append({key: value.clone() for key, value in batch.items()})
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _text_tasks(token_level: bool, n_tasks: int = 3, rows: int = 24) -> list[list[tuple[list[int], int]]]:
    """Tasks of two classes each; a row of class ``c`` holds tokens from ``10 c + 2 ... 10 c + 11``; batches of 8
    rows are 4, 7 or 10 tokens long, their rows up to 2 tokens shorter."""
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for task in range(n_tasks):
        items = []
        for row in range(rows):
            label = 2 * task + row % 2
            length = 4 + 3 * ((row // 8 + task) % 3) - row % 3
            items.append(((torch.randint(0, 10, (length,), generator=generator) + 10 * label + 2).tolist(), label))
        tasks.append(items)
    return tasks


def _text_loader(items, token_level: bool, batch_size: int = 8) -> torch.utils.data.DataLoader:
    def collate(rows):
        longest = max(len(tokens) for tokens, _ in rows)
        ids = torch.full((len(rows), longest), PAD_ID)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100) if token_level else torch.tensor([y for _, y in rows])
        for i, (tokens, label) in enumerate(rows):
            ids[i, : len(tokens)], mask[i, : len(tokens)] = torch.tensor(tokens), 1
            if token_level:
                labels[i, : len(tokens)] = label
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return torch.utils.data.DataLoader(items, batch_size=batch_size, collate_fn=collate)


def _assert_rows_are_dataset_rows_padded_per_key(batches, tasks, token_level: bool) -> None:
    """Every row the model saw is a row of the data, exactly, followed by the right padding for each key."""
    labels_of = {tuple(tokens): label for items in tasks for tokens, label in items}
    for batch in batches:
        lengths = batch["attention_mask"].sum(1)
        padding = batch["attention_mask"] == 0
        assert set(batch["input_ids"][padding].tolist()) <= {PAD_ID}
        for i, length in enumerate(lengths.tolist()):
            assert batch["attention_mask"][i, :length].tolist() == [1] * length  # real tokens, then padding
            label = labels_of[tuple(batch["input_ids"][i, :length].tolist())]
            if token_level:
                assert batch["labels"][i, :length].tolist() == [label] * length
                assert set(batch["labels"][i, length:].tolist()) <= {-100}
            else:
                assert int(batch["labels"][i]) == label


@pytest.mark.parametrize("fill", ["stream", "task_end"])
@pytest.mark.parametrize("token_level", [False, True])
def test_experience_replay_replays_variable_length_dict_batches_to_a_model_called_with_keywords(token_level, fill):
    L.seed_everything(0, verbose=False)
    tasks, model = _text_tasks(token_level), _TinyTextModel(token_level)
    replay = ExperienceReplay(buffer_size=12, ratio=1.0, fill=fill)
    for items in tasks:
        trainer(1, [replay]).fit(model, _text_loader(items, token_level))
    # class labels balance the buffer; token labels are no class of a row: the reservoir serves them
    assert replay.buffer.policy == ("reservoir" if token_level else "class_balanced")
    sizes = [len(batch["labels"]) for batch in model.batches]
    assert sizes == ([8] + [16] * 8 if fill == "stream" else [8] * 3 + [16] * 6)
    lengths = [batch["input_ids"].shape[1] for batch in model.batches]
    assert len(set(lengths)) > 2  # the stream's batches differ in length; the replayed rows are padded to fit them
    _assert_rows_are_dataset_rows_padded_per_key(model.batches, tasks, token_level)
    stored = replay.buffer.storage[0][: len(replay.buffer)]
    first_tokens = ((stored[:, 0] - 2) // 10).tolist()  # the class of each stored row
    if not token_level:
        assert torch.bincount(torch.tensor(first_tokens), minlength=6).tolist() == [2] * 6


def test_a_checkpoint_restores_a_buffer_of_sequence_rows_bit_for_bit(tmp_path):
    tasks, model = _text_tasks(token_level=True), _TinyTextModel(token_level=True)
    replay = ExperienceReplay(buffer_size=10, fill="stream")
    for items in tasks[:2]:
        fit = trainer(1, [replay])
        fit.fit(model, _text_loader(items, token_level=True))
    assert replay.buffer.lengths[0] is not None  # rows of different lengths are held
    fit.save_checkpoint(tmp_path / "task1.ckpt")
    restored = ExperienceReplay(buffer_size=10, fill="stream")
    load_task_checkpoint(tmp_path / "task1.ckpt", _TinyTextModel(token_level=True), [restored])
    assert_same_state(restored.state_dict(), replay.state_dict())
    assert restored.buffer.policy == "reservoir" and restored.buffer.pad_values == [PAD_ID, 0, -100]
    assert_same_state(tuple(restored.buffer.sample(10)), tuple(replay.buffer.sample(10)))


class _StoresTokenLogits(ReplayMethod):
    """Stores the token-level logits of every row, as DER does, and keeps what ``replay(..., masks=True)`` gives."""

    def __init__(self) -> None:
        super().__init__(buffer_size=12, policy="auto", fill="stream", seed=0)
        self.replays: list[tuple[dict, dict, dict]] = []

    def wrap_training_step(self, trainer, pl_module, batch, step):
        if len(self.buffer):
            self.replays.append(self.replay(batch, 8, masks=True))
        output = step(batch)
        self.insert(batch, {"logits": pl_module(**batch).logits.detach()})
        return output


def test_token_level_extras_are_replayed_with_a_mask_of_the_positions_they_were_stored_at():
    tasks, model, method = _text_tasks(token_level=True), _TinyTextModel(token_level=True), _StoresTokenLogits()
    for items in tasks[:2]:
        trainer(1, [method]).fit(model, _text_loader(items, token_level=True))
    (_, first, no_masks), *later = method.replays
    assert first["logits"].shape == (8, 4, 6) and no_masks == {}  # all rows stored so far were 4 tokens long
    assert len(later) == 4
    for replayed, extras, masks in later:
        logits, mask = extras["logits"], masks["logits"]
        assert logits.shape == (*replayed["input_ids"].shape, 6) and mask.shape == replayed["input_ids"].shape
        assert bool((replayed["attention_mask"].bool() <= mask).all())  # every real token's logits were stored
        assert bool((logits[~mask] == 0).all()) and bool((logits[mask] != 0).all())  # padding is 0, and only padding
        assert set(replayed["input_ids"][~mask].tolist()) <= {PAD_ID}


class _Regressor(L.LightningModule):
    """The documents' regression model: 10 -> 20 -> 1, MSE, Adam."""

    def __init__(self, target_shape: str = "[B]") -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 1))
        self.target_shape = target_shape

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if self.target_shape == "[B]" else out

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _regression_tasks(target_shape: str, n_tasks: int = 3, rows: int = 64) -> list[torch.utils.data.TensorDataset]:
    """One target function; each task's inputs around a different centre (a drifting stream)."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(10, generator=generator)
    tasks = []
    for task in range(n_tasks):
        x = torch.randn(rows, 10, generator=generator) + 2.0 * (task - 1)
        y = torch.sin(x @ weights / 3)
        tasks.append(torch.utils.data.TensorDataset(x, y if target_shape == "[B]" else y[:, None]))
    return tasks


@pytest.mark.parametrize("target_shape", ["[B]", "[B, 1]"])
def test_experience_replay_defaults_serve_regression_targets_with_the_reservoir(target_shape):
    tasks, mse = _regression_tasks(target_shape), {}
    for name in ("naive", "replay"):
        L.seed_everything(0, verbose=False)
        model, callbacks = _Regressor(target_shape), [ExperienceReplay()] if name == "replay" else []
        for task in tasks:
            trainer(5, callbacks).fit(model, torch.utils.data.DataLoader(task, batch_size=16))
        with torch.no_grad():
            mse[name] = sum(float(F.mse_loss(model(t.tensors[0]), t.tensors[1])) for t in tasks) / len(tasks)
        if name == "replay":
            replay = callbacks[0]
            assert replay.buffer.policy == "reservoir" and len(replay.buffer) == 192
            assert replay.buffer.storage[1].dtype == torch.float32
    assert mse["replay"] < 0.5 * mse["naive"], mse


@pytest.mark.parametrize("kind", ["regression", "token labels"])
def test_class_balanced_replay_refuses_targets_that_are_not_class_labels_at_the_first_step(kind):
    if kind == "regression":
        model, loader = _Regressor(), torch.utils.data.DataLoader(_regression_tasks("[B]")[0], batch_size=16)
    else:
        model, loader = _TinyTextModel(token_level=True), _text_loader(_text_tasks(True)[0], token_level=True)
    before = [p.detach().clone() for p in model.parameters()]
    message = r"ExperienceReplay\(policy='class_balanced'\) needs one integer class label per row.*policy='reservoir'"
    with pytest.raises(ValueError, match=message):
        trainer(1, [ExperienceReplay(policy="class_balanced")]).fit(model, loader)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # before any update


# ---------------------------------------------------------------------------------------------- the task-end pass
def test_the_task_end_fill_restores_train_mode_when_it_fails(split_stream):
    modes = []

    class _Failing(ExperienceReplay):
        def extras_at_task_end(self, pl_module, batch):
            modes.append(pl_module.training)
            raise RuntimeError("failed inside the task-end pass")

    model = tiny_model(split_stream)
    with pytest.raises(RuntimeError, match="inside the task-end pass"):
        trainer(1, [_Failing(fill="task_end")]).fit(model, train_loader(split_stream[0]))
    assert modes == [False] and model.training


class _Order(L.Callback):
    """Records the labels of every batch as the DataLoader yields it."""

    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1].tolist())


@pytest.mark.parametrize("own_generator", [False, True])
def test_the_task_end_fill_leaves_the_users_shuffles_as_they_were(own_generator, split_stream):
    """The same shuffled DataLoader over two fits draws the same orders with and without the task-end pass."""
    orders = {}
    for name in ("naive", "replay"):
        L.seed_everything(0, verbose=False)
        generator = torch.Generator().manual_seed(1) if own_generator else None
        loader = torch.utils.data.DataLoader(split_stream[0].train, batch_size=16, shuffle=True, generator=generator)
        order, model = _Order(), tiny_model(split_stream)
        callbacks = [ExperienceReplay(buffer_size=10, fill="task_end")] if name == "replay" else []
        for _ in range(2):
            trainer(1, [*callbacks, order]).fit(model, loader)
        orders[name] = order.labels
    assert orders["replay"] == orders["naive"]


# ---------------------------------------------------------------------------------------------- task-free use
def _said_nothing_replayed(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "replayed nothing in this fit" in str(w.message)]


def test_a_single_task_free_fit_with_the_defaults_trains_as_fine_tuning_and_says_to_fill_from_the_stream(split_stream):
    stream = torch.utils.data.ConcatDataset([task.train for task in split_stream])  # one fit, no task metadata
    weights, said = {}, {}
    for name, build in (
        ("naive", list),
        ("defaults", lambda: [ExperienceReplay()]),
        ("stream", lambda: [ExperienceReplay(fill="stream", policy="reservoir")]),
    ):
        model = tiny_model(split_stream)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer(1, build()).fit(model, torch.utils.data.DataLoader(stream, batch_size=16))
        weights[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
        said[name] = _said_nothing_replayed(caught)
    assert torch.equal(weights["defaults"], weights["naive"])  # the rows sat unused in the buffer ...
    assert len(said["defaults"]) == 1 and "ExperienceReplay(fill='stream')" in said["defaults"][0]  # ... and it says so
    assert not torch.equal(weights["stream"], weights["naive"]) and said["stream"] == []


def test_fits_of_a_task_stream_never_warn_that_nothing_was_replayed(split_stream):
    model, replay = tiny_model(split_stream), ExperienceReplay(buffer_size=30)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for task in list(split_stream)[:2]:
            trainer(1, [replay]).fit(model, train_loader(task))
    assert _said_nothing_replayed(caught) == [] and replay.tasks_completed == 2
