"""A mixture model under ``transformers.Trainer``: aux losses in the loss; with ``loramix.integrations``,
adapter-only checkpoints (tied embeddings), resume, and ``step_end`` after each optimizer step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from generation_fixtures import causal_lm, generation_examples, tied_llama
from loramix import MixtureModel
from loramix.integrations import MixtureTrainer, mixture_trainer_class
from loramix.train import stack_examples
from train_fixtures import classification_examples, classifier


def test_trainer_optimises_task_loss_plus_aux_losses(tmp_path):
    model = classifier(method="more", num_experts=1, r=4)
    examples = classification_examples(64)
    arguments = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=12,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        # the default column filter keeps what MixtureModel.forward's signature names: the wrapped
        # model's inputs plus task_ids
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=examples, data_collator=stack_examples)

    batch = stack_examples(examples[:16])
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch)).detach()
    aux = {name: value.detach() for name, value in model.last_aux_losses.items()}
    assert set(aux) == {"contrastive"} and float(aux["contrastive"]) > 0
    model.eval()
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    task_loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert loss.item() == pytest.approx(float(task_loss + 0.1 * aux["contrastive"]), rel=1e-4)

    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def _arguments(directory, **overrides) -> TrainingArguments:
    values = {
        "output_dir": str(directory),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(**{**values, **overrides})


def _mixture_trainer(directory, method="moelora", **overrides):
    model = causal_lm(method, tied=True)
    trainer = MixtureTrainer(
        model=model, args=_arguments(directory, **overrides), train_dataset=EXAMPLES, data_collator=stack_examples
    )
    return model, trainer


EXAMPLES = generation_examples(32)


def test_checkpoints_hold_only_the_adapter_and_resume_restores_it(tmp_path):
    """Tied embeddings (``Some tensors share memory`` with a full state dict) save; resume ends where a run ends."""
    model, trainer = _mixture_trainer(tmp_path / "full")
    trainer.train()
    expected = {key: value.clone() for key, value in model.adapter_state_dict().items()}
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert {"loramix_config.json", "adapter_model.safetensors"} <= {path.name for path in checkpoint.iterdir()}
    assert not list(checkpoint.glob("model*.safetensors"))
    assert set(load_file(str(checkpoint / "adapter_model.safetensors"))) == set(expected)
    loaded = MixtureModel.from_pretrained(tied_llama(), checkpoint)
    for key, value in expected.items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key

    resumed_model, resumed = _mixture_trainer(tmp_path / "resumed")
    with pytest.raises(ValueError, match="holds no loramix adapter"):
        resumed.train(resume_from_checkpoint=str(tmp_path))
    resumed_model, resumed = _mixture_trainer(tmp_path / "full")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for key, value in expected.items():
        torch.testing.assert_close(resumed_model.adapter_state_dict()[key], value, rtol=1e-6, atol=1e-7)
    assert any(
        not torch.equal(value, causal_lm(tied=True).adapter_state_dict()[key]) for key, value in expected.items()
    )


def test_step_end_runs_after_each_optimizer_step(tmp_path):
    """SMoRA's balance bias moves once per optimizer step (accumulation 2: half as many forwards)."""
    model, trainer = _mixture_trainer(
        tmp_path, method="smora", gradient_accumulation_steps=2, save_strategy="no", max_steps=3
    )
    calls = []
    original = model.step_end
    model.step_end = lambda: (calls.append(trainer.state.global_step), original())[1]
    trainer.train()
    assert len(calls) == 3
    biases = [name for name in model.adapter_state_dict() if name.endswith("balance_bias")]
    assert biases and all(model.adapter_state_dict()[name].abs().sum() > 0 for name in biases)


def test_trl_sft_trainer_trains_the_mixture_with_its_aux_loss_and_saves_the_adapter(tmp_path):
    """TRL's SFTTrainer (fused LM head moved inside the routing): loss = token mean + 0.1 x MoRE's contrastive."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = causal_lm("more", tied=True)
    rows = [{key: value.tolist() for key, value in example.items()} for example in EXAMPLES]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[PAD]": 0}, "[PAD]")))
    tokenizer.pad_token = "[PAD]"
    arguments = trl.SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer = mixture_trainer_class(trl.SFTTrainer)(
        model=model,
        args=arguments,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=stack_examples_of_lists,
        processing_class=tokenizer,
    )
    batch = stack_examples_of_lists(rows[:4])
    model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch)).detach()
    aux = model.last_aux_losses["contrastive"].detach()
    with torch.no_grad():
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert float(aux) > 0 and loss.item() == pytest.approx(float(token_loss + 0.1 * aux), rel=1e-5)

    before = {key: value.clone() for key, value in model.adapter_state_dict().items()}
    trainer.train()
    checkpoint = tmp_path / "checkpoint-4"
    assert not list(checkpoint.glob("model*.safetensors"))
    loaded = MixtureModel.from_pretrained(tied_llama(), checkpoint)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    assert any(not torch.equal(before[key], value) for key, value in model.adapter_state_dict().items())


def stack_examples_of_lists(features: list[dict]) -> dict[str, torch.Tensor]:
    """Collate rows of a ``datasets.Dataset`` (lists of ints) into a batch of tensors."""
    return {key: torch.tensor([feature[key] for feature in features]) for key in features[0]}


@pytest.mark.parametrize("method", ["more", "moelora"])
def test_mixture_trainer_objective_does_not_depend_on_accumulation(tmp_path, method):
    """Batch 8 == batch 4 x accumulation 2 under MixtureTrainer: token sum / the step's target tokens, MoRE's
    contrastive loss weighted by the micro-batch's share (plain Trainer adds it per micro-batch undivided)."""
    runs = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = causal_lm(method, tied=True)
        arguments = _arguments(
            tmp_path / str(batch),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=3,
            save_strategy="no",
        )
        trainer = MixtureTrainer(model=model, args=arguments, train_dataset=EXAMPLES, data_collator=stack_examples)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append((losses, model.adapter_state_dict()))
    assert len(runs[0][0]) == 3 and runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for key, value in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][key], value, rtol=1e-5, atol=1e-5)
    assert max(float(value.abs().max()) for key, value in runs[0][1].items() if "lora_B" in key) > 1e-3
