"""Continual learning on a sharded model: FSDP2 through Lightning's ``ModelParallelStrategy``, on 2 CPU processes.

``MLPClassifier.configure_model`` calls ``fully_shard`` on each linear layer and on the whole model (the README's
"Sharded models" shows it for a model of one's own): every rank holds half of each weight, and half of what EWC and LwF
keep for it. Five permuted-digits tasks in sequence, then the accuracy matrix::

    python examples/sharded_fsdp/train.py            # Lightning starts the second process itself
    python examples/sharded_fsdp/train.py --devices 4

On GPUs pass ``--accelerator gpu``. Every process runs the whole task loop; rank 0 prints the matrix.
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_incremental import EWC, ContinualEvaluation, LwF, MLPClassifier
from lightning_incremental.scenarios import digits_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()

    L.seed_everything(0)
    stream = digits_stream("permuted", n_tasks=5)
    model = MLPClassifier(64, stream.num_classes)  # its configure_model shards it: see the README's recipe
    methods = [EWC(), LwF()]  # the same instances in every task: they carry the state from task to task
    evaluation = ContinualEvaluation(stream)
    for task in stream:
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=args.devices,
            # data_parallel_size: "auto" would give one node's devices to tensor parallelism, not to FSDP
            strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
            max_epochs=args.epochs,
            callbacks=[*methods, evaluation],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, task.train_dataloader(batch_size=32, shuffle=True))
    if trainer.global_rank == 0:
        shard = methods[0].importance["net.0.weight"]
        print(f"rank 0 holds EWC's importance of net.0.weight as a {tuple(shard.shape)} shard of (256, 64)")
        print(evaluation.result().table())


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
