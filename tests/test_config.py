"""MixtureConfig: validation messages and JSON/YAML round trips."""

from __future__ import annotations

import pytest

from loramix import ConfigError, MixtureConfig


def test_json_and_yaml_round_trip(tmp_path) -> None:
    config = MixtureConfig(
        method="moelora",
        target_modules=["q_proj", "v_proj"],
        r=4,
        num_experts=3,
        num_tasks=2,
        task_names=["sst", "nli"],
        lora_dropout=0.1,
        modules_to_save=["heads"],
    )
    config.to_json(tmp_path / "c.json")
    config.to_yaml(tmp_path / "c.yaml")
    assert MixtureConfig.from_json(tmp_path / "c.json") == config
    assert MixtureConfig.from_yaml(tmp_path / "c.yaml") == config


@pytest.mark.parametrize(
    ("settings", "field", "allowed"),
    [
        ({"method": "nope"}, "method", "one of"),
        ({"r": 0}, "r", "positive integer"),
        ({"r": 2.5}, "r", "positive integer"),
        ({"num_tasks": -1}, "num_tasks", "positive integer"),
        ({"lora_alpha": 0}, "lora_alpha", "positive number"),
        ({"lora_dropout": 1.0}, "lora_dropout", r"\[0, 1\)"),
        ({"target_modules": []}, "target_modules", "non-empty list"),
        ({"target_modules": "(unclosed"}, "target_modules", "regex"),
        ({"top_k": 0}, "top_k", "positive integer"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight", "non-negative"),
        ({"num_tasks": 2, "task_names": ["a"]}, "task_names", "2 distinct names"),
        ({"init_lora_weights": "zeros"}, "init_lora_weights", "'kaiming' or 'gaussian'"),
        ({"num_experts": 2}, "num_experts", "'lora' has 1 expert"),
        ({"method": "per_task_lora", "num_tasks": 3, "num_experts": 2}, "num_experts", "one expert per task"),
        ({"method_options": {"x": 1}}, "method_options", "takes no options"),
    ],
)
def test_bad_values_name_the_field(settings: dict, field: str, allowed: str) -> None:
    with pytest.raises(ConfigError, match=rf"MixtureConfig\.{field}=.*{allowed}"):
        MixtureConfig(**settings)


def test_unknown_keys_are_rejected_by_name() -> None:
    with pytest.raises(ConfigError, match="unknown MixtureConfig fields \\['rank'\\]"):
        MixtureConfig.from_dict({"rank": 8})


def test_scale_and_task_index() -> None:
    assert MixtureConfig(r=4, lora_alpha=8).scale == 2.0
    assert MixtureConfig(r=4, lora_alpha=8, use_rslora=True).scale == 4.0
    config = MixtureConfig(method="per_task_lora", num_tasks=2, num_experts=2, task_names=["a", "b"])
    assert config.task_index("b") == 1 and config.task_index(0) == 0
    with pytest.raises(ValueError, match="out of range"):
        config.task_index(2)
