"""Per-task scores of a mixture model: accuracy (and loss) for classification, exact match for generation."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from loramix.data import ClassificationTemplate, Example, GenerationTemplate, MultiTaskCollator
from loramix.model import MixtureModel


def _device(model: MixtureModel) -> torch.device:
    return next(model.parameters()).device


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _by_task(examples: Sequence[Example]) -> dict[str, list[Example]]:
    grouped: dict[str, list[Example]] = {}
    for example in examples:
        grouped.setdefault(example.task, []).append(example)
    return grouped


@torch.no_grad()
def classification_scores(
    model: MixtureModel,
    examples: Sequence[Example],
    template: ClassificationTemplate,
    collator: MultiTaskCollator,
    batch_size: int = 32,
) -> dict[str, dict[str, float]]:
    """Accuracy and mean cross-entropy of each task.

    Args:
        model: a mixture over a :class:`~loramix.heads.MultiTaskSequenceClassifier`.
        examples: classification examples with ``task_id`` set.
        template: encodes an example (``input_ids``, ``labels`` class id, ``task_ids``).
        collator: pads features into a batch.
        batch_size: examples per forward.

    Returns:
        ``{task: {"accuracy", "loss", "count"}}``, tasks in order of first appearance.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    scores: dict[str, dict[str, float]] = {}
    for task, task_examples in _by_task(examples).items():
        correct, loss, count = 0, 0.0, 0
        for chunk in _chunks(task_examples, batch_size):
            batch = {key: value.to(device) for key, value in collator([template(e) for e in chunk]).items()}
            outputs = model(**batch)
            correct += int((outputs.logits.argmax(-1) == batch["labels"]).sum())
            loss += float(torch.nn.functional.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum"))
            count += len(chunk)
        scores[task] = {"accuracy": correct / count, "loss": loss / count, "count": count}
    model.train(was_training)
    return scores


def normalize_answer(text: str) -> str:
    """The form compared by exact match: surrounding space stripped, inner runs of space made single."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generation_scores(
    model: MixtureModel,
    examples: Sequence[Example],
    template: GenerationTemplate,
    tokenizer: Any,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> dict[str, dict[str, float]]:
    """Exact match of greedy generations against each example's references, per task.

    Prompts are left-padded and decoded greedily with each row routed by its task; the text generated
    after the prompt (special tokens dropped) matches when it equals any reference after
    :func:`normalize_answer`.

    Returns:
        ``{task: {"exact_match", "count"}}``, tasks in order of first appearance.
    """
    was_training = model.training
    model.eval()
    device = _device(model)
    collator = MultiTaskCollator(tokenizer, padding_side="left")
    pad_token_id = collator.pad_token_id
    scores: dict[str, dict[str, float]] = {}
    for task, task_examples in _by_task(examples).items():
        matches = 0
        for chunk in _chunks(task_examples, batch_size):
            features = [template.encode_prompt(example) for example in chunk]
            batch = {key: value.to(device) for key, value in collator(features).items()}
            output = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                task_ids=batch["task_ids"],
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_token_id,
            )
            texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for example, text in zip(chunk, texts, strict=True):
                references = example.references or (example.target,)
                matches += normalize_answer(text) in {normalize_answer(ref) for ref in references if ref is not None}
        scores[task] = {"exact_match": matches / len(task_examples), "count": len(task_examples)}
    model.train(was_training)
    return scores
