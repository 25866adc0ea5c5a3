"""The methods on a causal language model as a user writes it: a LightningModule that wraps a Hugging Face
``*ForCausalLM`` as ``self.model``, defines no ``forward``, and returns ``self.model(**batch).loss``; dict batches
padded per batch, labels of -100 on the prompt and the padding. A tiny Llama built from a config, random init.
"""

import lightning as L
import pytest
import torch
from harness import QUIET
from torch import nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_incremental import (
    AGEM,
    DER,
    EWC,
    MAS,
    SI,
    CandidateLikelihood,
    ContinualEvaluation,
    ExperienceReplay,
    GreedyExactMatch,
    LoRA,
    LwF,
    ModelInterface,
    candidate_item,
    collate_candidates,
    collate_generation,
    generation_item,
)
from lightning_incremental.methods.replay.der import stored_logits

VOCAB = 64


class CausalLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        self.model = LlamaForCausalLM(config)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)


def instruction_rows(task: int, n: int = 32) -> list[tuple[list[int], list[int]]]:
    """Prompts of random length ending in a key token; the answer is the key shifted by the task, then an end token."""
    generator = torch.Generator().manual_seed(task)
    rows = []
    for _ in range(n):
        length = int(torch.randint(3, 7, (1,), generator=generator))
        key = int(torch.randint(10, 60, (1,), generator=generator))
        prompt = [1, 2 + task, *torch.randint(10, 60, (length,), generator=generator).tolist(), key]
        rows.append((prompt, [(key + 7 * task) % 50 + 10, 3]))
    return rows


def collate(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``; ``labels`` the answer tokens, -100 elsewhere."""
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, answer) in enumerate(rows):
        end = len(prompt) + len(answer)
        input_ids[row, :end] = torch.tensor(prompt + answer)
        labels[row, len(prompt) : end] = torch.tensor(answer)
        attention_mask[row, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


METHODS = {
    "ewc": lambda: [EWC()],
    "si": lambda: [SI()],
    "mas": lambda: [MAS()],
    "lwf": lambda: [LwF()],
    "lwf_top_8_logits": lambda: [LwF(top_k=8)],
    "replay": lambda: [ExperienceReplay()],
    "der": lambda: [DER()],
    "derpp": lambda: [DER(alpha=0.3, beta=1.0)],
    "der_top_8_logits": lambda: [DER(stored_logits=8)],
    "agem": lambda: [AGEM()],
    "lora_merge": lambda: [LoRA(target_modules=["q_proj", "v_proj"])],
    "lora_per_task": lambda: [LoRA(target_modules=["q_proj", "v_proj"], mode="per_task")],
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_runs_two_instruction_tasks_on_a_causal_lm(name, precision):
    model, methods = CausalLM(), METHODS[name]()
    for task in range(2):
        trainer = L.Trainer(max_epochs=1, callbacks=methods, precision=precision, **QUIET)
        trainer.fit(model, DataLoader(instruction_rows(task), batch_size=8, collate_fn=collate))
    assert [method.tasks_completed for method in methods] == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_per_sample_loss_of_a_causal_lm_is_the_model_s_own_loss_of_each_row():
    # the logits at position t score the token at t + 1: the interface pairs them as Hugging Face's loss does
    model, interface = CausalLM(), ModelInterface()
    batch = collate(instruction_rows(0, n=4))
    with torch.no_grad():
        losses = interface.per_sample_loss(interface.predict(model, batch), batch)
        own = [model.model(**{key: value[row : row + 1] for key, value in batch.items()}).loss for row in range(4)]
    assert interface.shifts_labels
    torch.testing.assert_close(losses, torch.stack(own), rtol=0, atol=1e-5)


def test_a_module_without_forward_and_two_models_is_refused_with_the_fix():
    class TwoModels(CausalLM):
        def __init__(self) -> None:
            super().__init__()
            self.reference = nn.Linear(2, 2)

    with pytest.raises(TypeError, match=r"def forward\(self, \*\*batch\)"):
        ModelInterface().predict(TwoModels(), collate(instruction_rows(0, n=2)))


def test_lora_target_modules_name_layers_by_their_last_part_as_peft_does():
    model, lora = CausalLM(), LoRA(target_modules=["q_proj", "v_proj"])
    adapted = lora.inject(model)
    assert adapted == [f"model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    with pytest.raises(ValueError, match="`target_modules` pattern 'query' matches no linear layer"):
        LoRA(target_modules=["query"]).inject(CausalLM())


def test_token_level_terms_cover_the_positions_that_score_answer_tokens():
    model, interface = CausalLM(), ModelInterface()
    batch = collate([([1, 2, 11, 12], [30, 3]), ([1, 2, 13], [31, 3])])  # lengths 6 and 5: one padding position
    logits = torch.zeros(2, 6, VOCAB)
    # a causal LM: the positions before the answer tokens (the last prompt token and the first answer token)
    assert interface.answer_positions(model, logits, batch).tolist() == [
        [False, False, False, True, True, False],
        [False, False, True, True, False, False],
    ]
    # a token classifier (no shift): the labelled positions themselves
    assert (
        ModelInterface(causal=False).answer_positions(model, logits, batch).tolist()
        == (batch["labels"] != -100).tolist()
    )
    # without labels: the attention mask
    unlabelled = {key: value for key, value in batch.items() if key != "labels"}
    assert interface.answer_positions(model, logits, unlabelled).tolist() == batch["attention_mask"].bool().tolist()


def test_mas_measures_the_output_norm_at_the_answer_positions_only():
    # the prompt and the padding do not make a parameter important: only the logits that score answer tokens
    model, mas, interface = CausalLM(), MAS(), ModelInterface()
    batch = collate([([1, 2, 11, 12], [30, 3]), ([1, 2, 13], [31, 3])])
    logits = torch.randn(2, 6, VOCAB)
    answers = interface.answer_positions(model, logits, batch)
    expected = (logits.square().sum(-1) * answers).sum(-1)
    torch.testing.assert_close(mas.per_sample_loss(interface, model, logits, batch), expected)
    assert answers.sum().item() == 4  # of 11 real positions and 12 in all


def test_der_keeps_each_token_s_largest_logits_within_the_memory_bound():
    model, der = CausalLM(), DER(stored_logits=8)
    for task in range(2):
        L.Trainer(max_epochs=1, callbacks=[der], **QUIET).fit(
            model, DataLoader(instruction_rows(task), batch_size=8, collate_fn=collate)
        )
    values, indices = der.buffer.extras["top_logits"], der.buffer.extras["top_indices"]
    assert "logits" not in der.buffer.extras and values.shape[-1] == indices.shape[-1] == 8
    assert values.dtype == torch.float16 and indices.dtype == torch.int32
    assert (values.element_size() + indices.element_size()) * 8 * 64 <= 64 * 1024  # a 64-token row: 3 KiB here
    # at SmolLM2's vocabulary and the default 64 logits a token, a 64-token row takes 24 KiB (64 KiB allowed)
    kept = stored_logits(torch.randn(1, 64, 49_152), top_k=64)
    assert sum(t.numel() * t.element_size() for t in kept.values()) == 24 * 1024


def candidate_items(task: int, n: int = 16) -> list[dict]:
    """The task's prompts with 4 candidate answers; the right one at a position that varies."""
    items = []
    for index, (prompt, answer) in enumerate(instruction_rows(task, n)):
        wrong = [[(answer[0] + shift - 10) % 50 + 10, 3] for shift in (5, 17, 29)]
        right = index % 4
        items.append(candidate_item(prompt, [*wrong[:right], answer, *wrong[right:]], right))
    return items


def test_candidate_likelihood_scores_each_candidate_by_the_model_s_own_loss():
    model = CausalLM().eval()
    batch = collate_candidates(candidate_items(0, n=3))
    scores = CandidateLikelihood()(model, batch)
    assert scores.shape == (3, 4)
    for item in range(3):
        for k in range(4):
            row = {key: batch[key][item, k : k + 1] for key in ("input_ids", "attention_mask", "labels")}
            with torch.no_grad():
                own = model.model(**row).loss * (row["labels"] != -100).sum()  # the mean over the candidate's tokens
            torch.testing.assert_close(scores[item, k], -own, rtol=0, atol=1e-4)


class EvaluatedCausalLM(CausalLM):
    """The user's module with a validation step, so that Lightning prepares its validation loaders."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass


def test_continual_evaluation_measures_generative_tasks_by_candidate_likelihood():
    model = EvaluatedCausalLM()
    evaluation = ContinualEvaluation(predict=CandidateLikelihood(), num_classes=4)
    validation = [DataLoader(candidate_items(task), batch_size=8, collate_fn=collate_candidates) for task in range(2)]
    for task in range(2):
        train = DataLoader(instruction_rows(task), batch_size=8, collate_fn=collate)
        L.Trainer(max_epochs=1, callbacks=[evaluation], num_sanity_val_steps=0, **QUIET).fit(
            model, train, val_dataloaders=validation[: task + 1]
        )
    matrix = evaluation.matrix
    assert [len(row) for row in matrix] == [1, 2] and all(0.0 <= value <= 1.0 for row in matrix for value in row)
    rescored = CandidateLikelihood()(model.eval(), collate_candidates(candidate_items(1)))
    assert (rescored.argmax(-1) == torch.arange(16) % 4).float().mean().item() == matrix[1][1]  # deterministic


def general_text(n: int = 12) -> list[dict[str, torch.Tensor]]:
    """Batches of text of the base model's domain, with the language-model loss on every token."""
    generator = torch.Generator().manual_seed(99)
    batches = []
    for _ in range(n // 4):
        input_ids = torch.randint(10, 60, (4, 9), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids})
    return batches


class RowCounting(CausalLM):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def training_step(self, batch, batch_idx):
        self.rows.append(len(batch["input_ids"]))
        return super().training_step(batch, batch_idx)


def test_general_text_is_replayed_beside_every_task_and_only_it():
    model = RowCounting()
    general = ExperienceReplay(buffer_size=12, ratio=0.5, fill="none")  # a few general rows in every batch
    general.prefill(general_text())
    for task in range(2):
        L.Trainer(max_epochs=1, callbacks=[general], **QUIET).fit(
            model, DataLoader(instruction_rows(task), batch_size=8, collate_fn=collate)
        )
    input_ids = general.buffer.storage[0][: len(general.buffer)]  # the batch's first entry, row by row
    kept = {tuple(row.tolist()) for row in input_ids}
    assert len(general.buffer) == 12 and model.rows == [8 + 4] * 8  # 4 general rows joined each batch of 8
    assert kept == {tuple(row.tolist()) for batch in general_text() for row in batch["input_ids"]}


def test_lwf_with_the_base_teacher_keeps_the_model_before_the_first_task():
    model, lwf = CausalLM(), LwF(teacher="base")
    base = {name: t.clone() for name, t in model.state_dict().items()}
    for task in range(2):
        L.Trainer(max_epochs=1, callbacks=[lwf], **QUIET).fit(
            model, DataLoader(instruction_rows(task), batch_size=8, collate_fn=collate)
        )
    teacher = lwf.old.state_dict()
    assert all(torch.equal(teacher[name], base[name]) for name in base)
    assert not all(torch.equal(model.state_dict()[name], base[name]) for name in base)  # the model did train


def test_greedy_exact_match_generates_what_a_step_by_step_argmax_gives_left_padded_or_not():
    model = CausalLM().eval()
    items = [generation_item(prompt, answer) for prompt, answer in instruction_rows(0, n=3)]
    generated = GreedyExactMatch()(model, collate_generation(items))
    for row, item in enumerate(items):
        tokens = torch.tensor([item["input_ids"]])
        for _ in range(2):  # the answers have 2 tokens
            with torch.no_grad():
                next_token = model.model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
        assert generated[row].tolist() == tokens[0, -2:].tolist()


def test_continual_evaluation_measures_generative_tasks_by_exact_match():
    from torchmetrics.classification import MulticlassExactMatch

    model = EvaluatedCausalLM()
    metric = MulticlassExactMatch(VOCAB, ignore_index=-100)
    evaluation = ContinualEvaluation(predict=GreedyExactMatch(), metric=metric)
    items = [generation_item(prompt, answer) for prompt, answer in instruction_rows(0, n=8)]
    validation = DataLoader(items, batch_size=4, collate_fn=collate_generation)
    train = DataLoader(instruction_rows(0), batch_size=8, collate_fn=collate)
    L.Trainer(max_epochs=1, callbacks=[evaluation], num_sanity_val_steps=0, **QUIET).fit(
        model, train, val_dataloaders=[validation]
    )
    generated = GreedyExactMatch()(model.eval(), collate_generation(items))
    exact = [generated[row].tolist() == item["label"] for row, item in enumerate(items)]
    assert evaluation.matrix == [[sum(exact) / len(exact)]]
