"""LoRA: only the adapters (and the `train` extras) learn, the base stays bit-identical until an exact merge; one
frozen set per task; the trainable count; a tiny Hugging Face BERT with dict batches and a PEFT model; the
regularizers act on the adapters without fighting the merge; checkpoint resume; errors that name the fix."""

import importlib.util

import pytest
import torch
from harness import assert_same_weights, tiny_model, train_loader, trainer
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_incremental import load_task_checkpoint
from lightning_incremental.methods.fusion import WeightMerging
from lightning_incremental.methods.partial.lora import LoRA, LowRankAdapters
from lightning_incremental.methods.regularization import EWC, MAS, SI, L2Anchor
from lightning_incremental.models import MLPClassifier

needs_peft = pytest.mark.skipif(
    importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None,
    reason='needs the extra: pip install -e ".[pretrained]"',
)
PROBE_INPUT = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))


class Probe(Callback):
    """Placed before LoRA: what trains during the fit, and the model at the task end before LoRA merges."""

    def __init__(self, inputs: dict[str, torch.Tensor] | torch.Tensor = PROBE_INPUT) -> None:
        self.inputs = inputs
        self.trainable: list[str] = []
        self.before_merge: dict[str, torch.Tensor] = {}
        self.outputs_before_merge: torch.Tensor | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable = [name for name, p in pl_module.named_parameters() if p.requires_grad]

    def on_train_end(self, trainer, pl_module) -> None:
        self.before_merge = _weights(pl_module)
        self.outputs_before_merge = _outputs(pl_module, self.inputs)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@torch.no_grad()
def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    model.train(was_training)
    return getattr(out, "logits", out).clone()


class BNClassifier(MLPClassifier):
    """Linear, BatchNorm, ReLU, Linear: layers ``net.0``, ``net.1``, ``net.3``."""

    def __init__(self) -> None:
        super().__init__(16, 6, hidden=(), lr=1e-2)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 6))


# ---------------------------------------------------------------------------------------------- what trains
def test_only_adapters_and_train_extras_change_and_the_base_with_its_batchnorm_stays_bit_identical(split_stream):
    torch.manual_seed(0)
    model, probe = BNClassifier(), Probe()
    initial = _weights(model)
    lora = LoRA(target_modules="net.0", rank=2, train="net.3.*")
    trainer(2, [probe, lora]).fit(model, train_loader(split_stream[0]))

    adapters = ["net.0.lora.0.A.weight", "net.0.lora.0.B.weight"]
    assert probe.trainable == [*adapters, "net.3.weight", "net.3.bias"]
    for name, before in initial.items():  # the base layer and the BatchNorm (its statistics too) until the merge
        if not name.startswith("net.3."):
            assert torch.equal(probe.before_merge[name], before), name
    assert not torch.equal(probe.before_merge["net.3.weight"], initial["net.3.weight"])
    assert probe.before_merge["net.0.lora.0.B.weight"].abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())  # teardown gives the model back as built
    assert model.net[1].training


def test_merge_folds_the_adapters_into_the_weights_exactly_and_the_next_task_starts_fresh(split_stream):
    model, probe = tiny_model(split_stream), Probe()
    lora = LoRA(target_modules=["net.0", "net.2"], rank=4, alpha=8.0)
    trainer(2, [probe, lora]).fit(model, train_loader(split_stream[0]))

    before = probe.before_merge
    for layer in ("net.0", "net.2"):
        a, b = before[f"{layer}.lora.0.A.weight"], before[f"{layer}.lora.0.B.weight"]
        folded = before[f"{layer}.weight"] + (8.0 / 4) * b @ a
        torch.testing.assert_close(model.get_submodule(layer).weight.detach(), folded, rtol=0, atol=1e-6)
        fresh = model.get_submodule(layer).lora[0]  # a new Kaiming-uniform A in +-1/sqrt(in), and B = 0
        assert torch.count_nonzero(fresh["B"].weight) == 0
        assert not torch.equal(fresh["A"].weight.detach(), a)
        assert fresh["A"].weight.abs().max() <= fresh["A"].in_features ** -0.5
    torch.testing.assert_close(_outputs(model, PROBE_INPUT), probe.outputs_before_merge, rtol=0, atol=1e-5)


def test_per_task_mode_trains_a_new_set_each_task_and_keeps_the_earlier_ones_frozen_and_active(split_stream):
    model, probe = tiny_model(split_stream), Probe()
    initial = _weights(model)
    lora = LoRA(target_modules="net.0", rank=2, alpha=4.0, mode="per_task", train="net.2.*")
    trainer(1, [probe, lora]).fit(model, train_loader(split_stream[0]))
    after_first = _weights(model)
    trainer(1, [probe, lora]).fit(model, train_loader(split_stream[1]))

    assert probe.trainable == ["net.0.lora.1.A.weight", "net.0.lora.1.B.weight", "net.2.weight", "net.2.bias"]
    weights = _weights(model)
    for name in ("net.0.weight", "net.0.bias"):
        assert torch.equal(weights[name], initial[name]), name
    for name in ("net.0.lora.0.A.weight", "net.0.lora.0.B.weight"):
        assert torch.equal(weights[name], after_first[name]), name
    assert weights["net.0.lora.1.B.weight"].abs().sum() > 0
    assert lora.adapter_sets == 2
    # the layer computes W x + b + (alpha / rank) * sum_k B_k A_k x
    x, layer = PROBE_INPUT, model.net[0]
    update = sum(weights[f"net.0.lora.{k}.B.weight"] @ weights[f"net.0.lora.{k}.A.weight"] for k in (0, 1))
    expected = F.linear(x, weights["net.0.weight"] + (4.0 / 2) * update, weights["net.0.bias"])
    torch.testing.assert_close(layer(x).detach(), expected, rtol=0, atol=1e-5)


def test_trainable_count_is_rank_times_in_plus_out_per_layer_plus_the_extras(split_stream):
    model, probe = tiny_model(split_stream), Probe()  # 16 -> 32 -> 6
    trainer(1, [probe, LoRA(module_types=nn.Linear, rank=3, train="net.2.*")]).fit(model, train_loader(split_stream[0]))
    count = sum(model.get_parameter(name).numel() for name in probe.trainable)
    assert count == 3 * (16 + 32) + 3 * (32 + 6) + (32 * 6 + 6)


# ---------------------------------------------------------------------------------------------- Hugging Face, PEFT
def tiny_bert_classifier() -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class HFModule(LightningModule):
    """A Hugging Face model on dict batches: ``model(**batch).loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor):
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def text_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (24, 6), generator=generator)
    rows = [
        {"input_ids": ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": torch.tensor(i % 3)}
        for i in range(24)
    ]
    return DataLoader(rows, batch_size=8)


TEXT_INPUT = {"input_ids": torch.tensor([[2, 5, 7, 3, 9, 4]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}


@needs_peft
def test_a_hugging_face_bert_with_dict_batches_trains_only_its_query_value_adapters_and_the_classifier():
    module, probe = HFModule(tiny_bert_classifier()), Probe(TEXT_INPUT)
    initial = _weights(module)
    lora = LoRA(target_modules=["*.query", "*.value"], rank=2, train="*.classifier.*")
    trainer(2, [probe, lora]).fit(module, text_loader())

    layers = [f"model.bert.encoder.layer.0.attention.self.{name}" for name in ("query", "value")]
    adapters = [f"{layer}.lora.0.{m}.weight" for layer in layers for m in ("A", "B")]
    assert probe.trainable == [*adapters, "model.classifier.weight", "model.classifier.bias"]
    assert sum(module.get_parameter(name).numel() for name in probe.trainable) == 2 * 2 * (16 + 16) + 16 * 3 + 3
    for name, before in initial.items():
        if "classifier" not in name:
            assert torch.equal(probe.before_merge[name], before), name
    assert probe.before_merge[adapters[1]].abs().sum() > 0
    torch.testing.assert_close(_outputs(module, TEXT_INPUT), probe.outputs_before_merge, rtol=0, atol=1e-5)


@needs_peft
def test_a_peft_model_keeps_its_own_adapters_which_train_and_merge_through_peft():
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    module, probe = HFModule(peft.get_peft_model(tiny_bert_classifier(), config)), Probe(TEXT_INPUT)
    peft_trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    initial = _weights(module)
    lora = LoRA()
    trainer(2, [probe, lora]).fit(module, text_loader())

    assert not any(isinstance(m, LowRankAdapters) for m in module.modules())
    assert probe.trainable == peft_trainable  # PEFT's lora_A / lora_B and the classifier's modules_to_save
    assert [name for name, p in module.named_parameters() if p.requires_grad] == peft_trainable
    query = module.model.base_model.model.bert.encoder.layer[0].attention.self.query
    prefix = "model.base_model.model.bert.encoder.layer.0.attention.self.query."
    before = probe.before_merge
    assert torch.equal(before[prefix + "base_layer.weight"], initial[prefix + "base_layer.weight"])
    delta = (4 / 2) * before[prefix + "lora_B.default.weight"] @ before[prefix + "lora_A.default.weight"]
    assert delta.abs().sum() > 0
    torch.testing.assert_close(
        query.base_layer.weight.detach(), before[prefix + "base_layer.weight"] + delta, rtol=0, atol=1e-6
    )
    assert not query.merged and torch.count_nonzero(query.lora_B["default"].weight) == 0
    torch.testing.assert_close(_outputs(module, TEXT_INPUT), probe.outputs_before_merge, rtol=0, atol=1e-5)

    with pytest.raises(ValueError, match="leave out `target_modules`"):
        LoRA(target_modules="*.query").inject(module)
    with pytest.raises(ValueError, match="use mode='merge' with the PEFT model"):
        LoRA(mode="per_task").inject(module)


# ---------------------------------------------------------------------------------------------- regularizers
@pytest.mark.parametrize("regularizer", [EWC, MAS, SI, L2Anchor])
def test_regularizers_consolidate_exactly_the_adapters_at_the_merged_model_so_the_penalty_starts_at_zero(
    split_stream, regularizer
):
    model = tiny_model(split_stream)
    lora, penalty = LoRA(target_modules="net.0", rank=2, train="net.2.*"), regularizer(lambda_=10.0)
    trainer(1, [lora, penalty]).fit(model, train_loader(split_stream[0]))

    adapters = ["net.0.lora.0.A.weight", "net.0.lora.0.B.weight"]
    assert sorted(penalty.importance) == sorted([*adapters, "net.2.weight", "net.2.bias"])
    # anchored at the model after the merge: B* = 0 is the merged model, and theta = theta* when task 1 starts
    for name, anchor in penalty.anchor.items():
        assert torch.equal(anchor, model.get_parameter(name).detach().float()), name
    assert torch.count_nonzero(penalty.anchor["net.0.lora.0.B.weight"]) == 0
    if regularizer in (EWC, MAS):  # their gradients with respect to A vanish at B = 0
        assert torch.count_nonzero(penalty.importance["net.0.lora.0.A.weight"]) == 0
        assert penalty.importance["net.0.lora.0.B.weight"].sum() > 0


def test_ewc_penalty_restrains_the_next_adapters_and_a_weight_reader_before_lora_is_refused(split_stream):
    def second_task_update(lambda_: float) -> float:
        model = tiny_model(split_stream)
        methods = [LoRA(target_modules="net.0", rank=2), EWC(lambda_=lambda_)]
        trainer(1, methods).fit(model, train_loader(split_stream[0]))
        merged = model.net[0].weight.detach().clone()
        trainer(1, methods).fit(model, train_loader(split_stream[1]))
        return (model.net[0].weight.detach() - merged).norm().item()

    assert second_task_update(1e4) < 0.6 * second_task_update(0.0)  # measured: 1.11 against 2.22
    for before in (EWC(), WeightMerging(mode="ties")):
        name = type(before).__name__
        with pytest.raises(ValueError, match=rf"put LoRA first \(callbacks=\[LoRA\(...\), {name}"):
            trainer(1, [before, LoRA(target_modules="net.0")]).fit(
                tiny_model(split_stream), train_loader(split_stream[0])
            )


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", ["merge", "per_task"])
def test_a_new_process_resumes_between_tasks_and_mid_task_as_if_never_stopped(split_stream, tmp_path, mode):
    def methods() -> list[Callback]:
        return [LoRA(target_modules="net.0", rank=2, mode=mode, train="net.2.*"), EWC(lambda_=10.0)]

    first, second = train_loader(split_stream[0]), train_loader(split_stream[1])
    model, uninterrupted = tiny_model(split_stream), methods()
    first_trainer = trainer(1, uninterrupted)
    first_trainer.fit(model, first)
    first_trainer.save_checkpoint(tmp_path / "between.ckpt")
    trainer(2, uninterrupted).fit(model, second)
    expected = _weights(model)

    # a new process starts task 1 from the checkpoint saved between the tasks, and stops after one epoch of two
    model, restarted = tiny_model(split_stream), methods()  # the model as built, fresh callbacks
    load_task_checkpoint(tmp_path / "between.ckpt", model, restarted)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(1, [*restarted, checkpoint], enable_checkpointing=True).fit(model, second)

    # another new process resumes task 1 mid-way with ckpt_path
    model, resumed = tiny_model(split_stream), methods()
    trainer(2, resumed).fit(model, second, ckpt_path=tmp_path / "last.ckpt")
    assert_same_weights(_weights(model), expected)
    assert resumed[0].adapter_sets == uninterrupted[0].adapter_sets == (2 if mode == "per_task" else 1)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_arguments_get_errors_that_name_the_fix(split_stream):
    model = tiny_model(split_stream)
    with pytest.raises(
        ValueError, match=r"'net\.9' matches no linear layer of .*; its linear layer names are like: net\.0, net\.2"
    ):
        LoRA(target_modules="net.9").inject(model)
    with pytest.raises(ValueError, match=r"`target_modules=\[...\]` .* linear layers of MLPClassifier are: net\.0"):
        LoRA().inject(model)
    with pytest.raises(ValueError, match="`rank` must be an integer >= 1"):
        LoRA(target_modules="net.0", rank=0)
    with pytest.raises(TypeError, match=r"`module_types` takes linear layer types, nn.Linear .* Conv2d"):
        LoRA(module_types=nn.Conv2d)
    with pytest.raises(ValueError, match="`mode` must be 'merge' or 'per_task'"):
        LoRA(target_modules="net.0", mode="average")
    with pytest.raises(ValueError, match=r"`train` pattern 'head\.\*' matches no parameter"):
        trainer(1, [LoRA(target_modules="net.0", train="head.*")]).fit(model, train_loader(split_stream[0]))
    lora = LoRA(target_modules="net.0")
    trainer(1, [lora]).fit(model, train_loader(split_stream[0]))
    with pytest.raises(RuntimeError, match=r"lost them\. Under ddp_spawn / ddp_fork call `lora\.inject\(model\)`"):
        trainer(1, [lora]).fit(tiny_model(split_stream), train_loader(split_stream[1]))  # a model without them
