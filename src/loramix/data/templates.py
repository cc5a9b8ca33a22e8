"""Turn examples into token features, unpadded: classification (text -> class id) and generation.

A template is a callable ``template(example) -> features``; the collators in
:mod:`loramix.data.collate` pad a list of features into tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loramix.data.sources import DataError, Example

IGNORE_INDEX = -100
"""Label value that the losses ignore (prompt and padding tokens)."""


def _task_id(example: Example) -> int:
    if example.task_id is None:
        raise DataError(f"example of task {example.task!r} has no task_id; pass it through TaskSet.assign")
    return example.task_id


@dataclass
class ClassificationTemplate:
    """Encode a classification example as ``input_ids`` and its class id.

    Args:
        tokenizer: A Hugging Face tokenizer.
        max_length: Longer inputs are truncated to this many tokens (special tokens included).
        instructions: Optional text per task name, put before the example's text (a blank line between).
    """

    tokenizer: Any
    max_length: int = 256
    instructions: Mapping[str, str] | None = None

    def __call__(self, example: Example) -> dict[str, Any]:
        """Encode one example.

        Args:
            example: A classification example with ``label`` and ``task_id`` set.

        Returns:
            ``input_ids`` (list[int], at most ``max_length``), ``attention_mask`` (list[int]),
            ``labels`` (int class id) and ``task_ids`` (int).

        Raises:
            DataError: When the example has no label or no task id.
        """
        if example.label is None:
            raise DataError(f"example of task {example.task!r} has no label for a classification template")
        text = example.text
        instruction = (self.instructions or {}).get(example.task)
        if instruction:
            text = f"{instruction}\n\n{text}"
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
        return {
            "input_ids": list(encoded["input_ids"]),
            "attention_mask": [1] * len(encoded["input_ids"]),
            "labels": example.label,
            "task_ids": _task_id(example),
        }


@dataclass
class GenerationTemplate:
    """Encode a generation example as prompt + target tokens, with the loss on the target only.

    The prompt is the example's text, wrapped in the tokenizer's chat template as a user turn (after an
    optional system prompt) when the tokenizer has one, else followed by ``separator``. The target is
    followed by the end-of-sequence token, which for chat models such as SmolLM2 closes the assistant
    turn. ``labels`` copy the target tokens and are ``-100`` on the prompt.

    Args:
        tokenizer: A Hugging Face tokenizer.
        max_length: Prompt + target are cut to this many tokens: the target keeps at most half of them
            when both do not fit, and the prompt loses tokens from its start.
        system_prompt: A system message for the chat template (None: the template's default).
        use_chat_template: Force the chat template on or off; None uses it when the tokenizer has one.
        separator: Put between prompt and target when no chat template is used.
        instructions: Optional text per task name, put before the example's text (a blank line between).
    """

    tokenizer: Any
    max_length: int = 512
    system_prompt: str | None = None
    use_chat_template: bool | None = None
    separator: str = "\n"
    instructions: Mapping[str, str] | None = None

    def _chat(self) -> bool:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if self.use_chat_template and not has_template:
            raise DataError("use_chat_template=True but the tokenizer has no chat template")
        return has_template if self.use_chat_template is None else self.use_chat_template

    def prompt_text(self, example: Example) -> str:
        """The prompt as a string: chat-formatted up to the assistant's turn, or text + separator."""
        text = example.text
        instruction = (self.instructions or {}).get(example.task)
        if instruction:
            text = f"{instruction}\n\n{text}"
        if not self._chat():
            return text + self.separator
        messages = [{"role": "user", "content": text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, example: Example) -> list[int]:
        """Token ids of the prompt alone (for ``generate``), cut from the start to ``max_length``."""
        chat = self._chat()
        ids = self.tokenizer(self.prompt_text(example), add_special_tokens=not chat)["input_ids"]
        return list(ids)[-self.max_length :]

    def encode_prompt(self, example: Example) -> dict[str, Any]:
        """Encode the prompt alone, for generation at evaluation time.

        Returns:
            ``input_ids`` and ``attention_mask`` (list[int]) and ``task_ids`` (int).
        """
        ids = self.prompt_ids(example)
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "task_ids": _task_id(example)}

    def __call__(self, example: Example) -> dict[str, Any]:
        """Encode one example for training.

        Args:
            example: A generation example with ``target`` and ``task_id`` set.

        Returns:
            ``input_ids``, ``attention_mask`` and ``labels`` (list[int] of one length, at most
            ``max_length``; ``labels`` is -100 on prompt tokens), and ``task_ids`` (int).

        Raises:
            DataError: When the example has no target or no task id.
        """
        if example.target is None:
            raise DataError(f"example of task {example.task!r} has no target for a generation template")
        chat = self._chat()
        prompt = list(self.tokenizer(self.prompt_text(example), add_special_tokens=not chat)["input_ids"])
        target = list(self.tokenizer(example.target, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            target.append(self.tokenizer.eos_token_id)
        if len(prompt) + len(target) > self.max_length:
            target = target[: max(self.max_length - len(prompt), self.max_length // 2)]
            prompt = prompt[max(len(prompt) - (self.max_length - len(target)), 0) :]
        input_ids = prompt + target
        return {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt) + target,
            "task_ids": _task_id(example),
        }
