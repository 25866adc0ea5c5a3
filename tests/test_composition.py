"""Methods stack in one Trainer in any order: every ordered pair of methods from different families, three-method
stacks, and what an inner method sees of the rows an outer replay method adds."""

import itertools

import pytest
import torch
from harness import tiny_model, train_loader, trainer

from lightning_incremental import (
    DER,
    EWC,
    ContinualEvaluation,
    ExperienceReplay,
    FreezeLayers,
    GrowHeads,
    LwF,
    MLPClassifier,
    WeightMerging,
)

# one representative per family, with what proves it acted after two tasks
FAMILIES = {
    "regularization": (lambda: EWC(lambda_=10.0), lambda m: len(m.importance) > 0),
    "replay": (lambda: ExperienceReplay(buffer_size=24), lambda m: len(m.buffer) == 24),
    "distillation": (lambda: LwF(), lambda m: m.old_model is not None and m.old_tasks == [[0, 1], [2, 3]]),
    "fusion": (lambda: WeightMerging(alpha=0.5), lambda m: m.tasks_completed == 2),
    "partial": (lambda: FreezeLayers(train_last=1, from_task=1), lambda m: m.tasks_completed == 2),
    "heads": (lambda: GrowHeads(), lambda m: m.tasks_completed == 2),
}
PAIRS = list(itertools.permutations(FAMILIES, 2))
STACKS = [
    ("replay", "distillation", "regularization"),
    ("regularization", "distillation", "replay"),
    ("distillation", "replay", "fusion"),
    ("heads", "replay", "distillation"),
    ("partial", "regularization", "replay"),
]


def _model(split_stream, families):
    torch.manual_seed(0)
    if "heads" in families:  # GrowHeads grows an IncrementalClassifier from zero classes
        return MLPClassifier(16, 0, hidden=(32,), head="incremental", lr=1e-2)
    return tiny_model(split_stream)


def _run_stack(split_stream, families):
    methods = [FAMILIES[name][0]() for name in families]
    model, evaluation = _model(split_stream, families), ContinualEvaluation(split_stream[:2])
    for task in split_stream[:2]:
        trainer(1, [*methods, evaluation]).fit(model, train_loader(task))
    return methods, evaluation


@pytest.mark.parametrize("families", PAIRS + STACKS, ids=["+".join(f) for f in PAIRS + STACKS])
def test_methods_of_different_families_stack_in_either_order(split_stream, families):
    methods, evaluation = _run_stack(split_stream, families)
    for name, method in zip(families, methods, strict=True):
        assert FAMILIES[name][1](method), f"{name} did not act in the stack {families}"
    assert len(evaluation.matrix) == 2 and all(0.0 <= value <= 1.0 for value in evaluation.matrix[1])


class _RowCountingLwF(LwF):
    """Records how many rows of logits it distils on at every step."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def wrap_training_step(self, trainer, pl_module, batch, step):
        output = step(batch)
        self.rows.append(step.logits_for(batch).shape[0])
        return output


@pytest.mark.parametrize(("replay_first", "expected_rows"), [(True, 8 + 16), (False, 8)])
def test_an_inner_method_sees_the_rows_an_outer_replay_method_adds(split_stream, replay_first, expected_rows):
    replay, lwf = ExperienceReplay(buffer_size=24, replay_batch_size=16), _RowCountingLwF()
    model = tiny_model(split_stream)
    callbacks = [replay, lwf] if replay_first else [lwf, replay]
    for task in split_stream[:2]:
        trainer(1, callbacks).fit(model, train_loader(task, batch_size=8))
    first_task_steps = len(train_loader(split_stream[0], batch_size=8))
    assert set(lwf.rows[:first_task_steps]) == {8}  # nothing to replay during the first task
    assert set(lwf.rows[first_task_steps:]) == {expected_rows}


def test_the_stack_reads_the_model_outputs_once_per_step(split_stream):
    forwards = []
    model = tiny_model(split_stream)
    model.net.register_forward_hook(lambda *_: forwards.append(1))
    readers = [LwF(), DER(buffer_size=24, alpha=0.0)]  # both read the step's logits, neither forwards on its own
    trainer(1, readers, limit_train_batches=3).fit(model, train_loader(split_stream[0], batch_size=8))
    assert len(forwards) == 3 + 1  # the user's step, once per step, and the one probe that found the logits module
    assert len(readers[1].buffer) == 24


def test_two_methods_naming_different_logits_modules_are_refused(split_stream):
    model = tiny_model(split_stream)
    methods = [LwF(logits_module="net"), LwF(logits_module="net.2")]
    with pytest.raises(ValueError, match="name different logits modules"):
        trainer(1, methods).fit(model, train_loader(split_stream[0]))
    assert "training_step" not in model.__dict__  # the wrapper was removed again
