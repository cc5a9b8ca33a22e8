"""A tiny causal LM wrapped with a mixture, and generation examples whose targets differ in length."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loramix import MixtureConfig, get_mixture_model
from loramix.model import MixtureModel
from loramix.train import TensorBatches
from tiny_models import VOCAB, build

SEQ_LEN = 12
torch.set_num_threads(1)


def tied_llama(seed: int = 0) -> torch.nn.Module:
    """The tiny Llama of ``tiny_models`` with its output layer tied to the input embeddings (SmolLM2's layout)."""
    base = build("llama", seed=seed)
    config = LlamaConfig(**{**base.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def causal_lm(
    method: str = "moelora", num_tasks: int = 2, seed: int = 0, tied: bool = False, **mixture
) -> MixtureModel:
    """The tiny Llama of ``tiny_models`` (tied embeddings if asked) with a mixture on q/v projections."""
    defaults = {"more": {"r": 4}, "smora": {"r": 8, "method_options": {"top_k": 2}}}.get(
        method, {"r": 2, "num_experts": 2}
    )
    settings = {**defaults, **mixture}
    config = MixtureConfig(method=method, target_modules=["q_proj", "v_proj"], num_tasks=num_tasks, **settings)
    return get_mixture_model(tied_llama(seed) if tied else build("llama", seed=seed), config)


def generation_examples(count: int = 32, num_tasks: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded prompt + target rows: prompts of 2-5 tokens, targets of 1-6 tokens (labels -100 elsewhere)."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        prompt = int(torch.randint(2, 6, (1,), generator=generator))
        target = int(torch.randint(1, 7, (1,), generator=generator))
        length = prompt + target
        input_ids = torch.zeros(SEQ_LEN, dtype=torch.long)
        input_ids[:length] = torch.randint(3, VOCAB, (length,), generator=generator)
        labels = torch.full((SEQ_LEN,), -100, dtype=torch.long)
        labels[prompt:length] = input_ids[prompt:length]
        attention_mask = torch.zeros(SEQ_LEN, dtype=torch.long)
        attention_mask[:length] = 1
        examples.append(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "task_ids": torch.tensor(index % num_tasks),
            }
        )
    return examples


def generation_factory(examples: list[dict[str, torch.Tensor]], batch_size: int, seed: int = 0):
    """A trainer batch factory serving ``examples`` through :class:`TensorBatches`."""

    def make(stage, rank: int, world_size: int) -> TensorBatches:
        return TensorBatches(examples, batch_size, seed=seed, rank=rank, world_size=world_size)

    return make
