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


# top_k moved from the shared config into the options of the methods with top-k routing
TOP_K_CASES = {
    "mixlora": ({"r": 2, "num_experts": 4}, 3),
    "hydralora": ({"r": 2, "num_experts": 3}, 2),
    "malora": ({"r": 2, "num_experts": 4}, 3),
    "smora": ({"r": 8}, 3),
}


def _top_k_model(config: MixtureConfig, seed: int = 0):
    from loramix import get_mixture_model
    from tiny_models import build

    return get_mixture_model(build("llama", seed=seed), config)


@pytest.mark.parametrize("method", sorted(TOP_K_CASES))
def test_old_config_with_top_level_top_k_loads_to_the_same_model(method: str, tmp_path) -> None:
    import json

    import torch

    from loramix import MixtureModel
    from tiny_models import TARGETS, batch, build, randomize_adapters

    settings, top_k = TOP_K_CASES[method]
    config = MixtureConfig(method=method, target_modules=TARGETS["llama"], method_options={"top_k": top_k}, **settings)
    mixture = _top_k_model(config)
    randomize_adapters(mixture)
    inputs = batch("llama")
    expected = mixture(**inputs).logits
    mixture.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "loramix_config.json").read_text())
    assert saved["method_options"] == {"top_k": top_k} and "top_k" not in saved
    # the file as earlier versions wrote it: top_k at the top level, no method option
    saved["top_k"] = saved["method_options"].pop("top_k")
    (tmp_path / "loramix_config.json").write_text(json.dumps(saved))
    restored = MixtureModel.from_pretrained(build("llama"), tmp_path)
    assert restored.mixture_config.method_options == {"top_k": top_k}
    assert restored.mixture_config == config
    torch.testing.assert_close(restored(**inputs).logits, expected, rtol=0, atol=0)
    # top_k does change the model: the method's default routes differently on the same weights
    default_config = MixtureConfig(method=method, target_modules=TARGETS["llama"], **settings)
    assert default_config != config
    default = _top_k_model(default_config)
    default.load_state_dict(mixture.state_dict())
    assert not torch.allclose(default(**inputs).logits, expected)


def test_top_k_keyword_and_top_level_key_move_into_method_options() -> None:
    import dataclasses

    moved = MixtureConfig(method="mixlora", num_experts=4, top_k=3)
    assert moved == MixtureConfig(method="mixlora", num_experts=4, method_options={"top_k": 3})
    assert moved.method_options == {"top_k": 3} and "top_k" not in moved.to_dict()
    assert MixtureConfig.from_dict({"method": "smora", "r": 4, "top_k": None}).method_options == {}
    same = MixtureConfig(method="malora", num_experts=4, top_k=2, method_options={"top_k": 2, "balance_factor": 2.0})
    assert same.method_options == {"top_k": 2, "balance_factor": 2.0}
    assert dataclasses.replace(moved, r=4).method_options == {"top_k": 3}


@pytest.mark.parametrize(
    ("settings", "pattern"),
    [
        ({"method": "lora", "top_k": 1}, r"MixtureConfig\.top_k=1 is invalid: method 'lora' has no top-k routing"),
        ({"method": "more", "r": 4, "top_k": 2}, r"MixtureConfig\.top_k=2 is invalid: method 'more' has no top-k"),
        ({"method": "mixlora", "num_experts": 4, "top_k": "2"}, r"MixtureConfig\.top_k='2' is invalid"),
        ({"method": "mixlora", "num_experts": 4, "top_k": 0}, r"MixtureConfig\.top_k=0 is invalid"),
        ({"method": "mixlora", "num_experts": 2, "top_k": 3}, r"method_options\['top_k'\]=3 .*num_experts=2"),
        ({"method": "smora", "r": 4, "method_options": {"top_k": 5}}, r"method_options\['top_k'\]=5 .*r=4"),
        ({"method": "mode", "num_experts": 2, "method_options": {"top_k": 1}}, r"\{'top_k': 1\} .*'mode' takes no"),
        ({"method": "malora", "num_experts": 2, "method_options": {"top_k": 3}}, r"method_options\['top_k'\]=3"),
        (
            {"method": "mixlora", "num_experts": 4, "top_k": 2, "method_options": {"top_k": 3}},
            r"MixtureConfig\.top_k=2 conflicts with method_options\['top_k'\]=3",
        ),
    ],
)
def test_unknown_or_invalid_top_k_is_rejected_by_name(settings: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        MixtureConfig(**settings)
    with pytest.raises(ConfigError, match=pattern):
        MixtureConfig.from_dict(settings)


def test_top_k_defaults_live_in_each_method_options() -> None:
    from loramix.methods import get_method

    def top_k(method: str, **settings) -> int | None:
        return get_method(method).options(MixtureConfig(method=method, **settings)).top_k

    assert top_k("mixlora", num_experts=8) == 2 and top_k("malora", num_experts=8) == 2
    assert top_k("mixlora", num_experts=1) == 1  # capped at the count it selects from
    assert top_k("hydralora", num_experts=4) is None  # dense
    assert top_k("smora", r=32) == 8 and top_k("smora", r=4) == 4
    assert top_k("smora", r=32, method_options={"top_k": 16}) == 16
