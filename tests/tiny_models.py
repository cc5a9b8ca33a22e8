"""Tiny transformers models built from configs (no download), one per architecture family."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 97
ARCHITECTURES = ("bert", "llama", "gpt2", "t5")
# Targets of each family's attention and feed-forward projections.
TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
}


# A small valid setting of every registered method (r, experts, top-k), for tests that sweep all methods.
METHOD_SETTINGS = {
    "lora": {"r": 2},
    "per_task_lora": {"r": 2, "num_experts": 3},
    "moelora": {"r": 2, "num_experts": 3},
    "more": {"r": 4},
    "moa": {"r": 2, "num_experts": 3},
    "mtl_lora": {"r": 2, "num_experts": 3},
    "hydralora": {"r": 2, "num_experts": 3},
    "mixlora": {"r": 2, "num_experts": 4},
    "mode": {"r": 2, "num_experts": 3},
    "smora": {"r": 8, "method_options": {"top_k": 2}},
    "malora": {"r": 2, "num_experts": 4},
    "conditional_mixlora": {"r": 2, "num_experts": 6},
    "melora": {"r": 2, "num_experts": 2},
}
# Methods that route on the input (per token or per sequence) and so cannot merge a task.
INPUT_ROUTED = ("hydralora", "mixlora", "mode", "smora", "malora", "conditional_mixlora")


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model of family ``arch`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    if arch == "bert":
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=64,
            num_labels=3,
        )
        model = BertForSequenceClassification(config)
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
        model = GPT2LMHeadModel(config)
    elif arch == "t5":
        config = T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        model = T5ForConditionalGeneration(config)
    else:
        raise ValueError(arch)
    return model.eval()


def batch(arch: str, batch_size: int = 3, seq_len: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for ``arch`` with some right padding (so masks matter)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if arch == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (batch_size, 5), generator=generator)
    return inputs


def randomize_adapters(model: torch.nn.Module, std: float = 0.2, seed: int = 2) -> None:
    """Give every adapter parameter a random value so deltas are non-zero (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_" in name or "router" in name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def output_of(outputs) -> torch.Tensor:
    """The logits of a model output."""
    return outputs.logits
