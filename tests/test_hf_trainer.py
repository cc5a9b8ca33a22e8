"""A mixture model trains under ``transformers.Trainer`` with its auxiliary losses in the loss."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

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
