"""The end-to-end benchmark runs through ``loramix bench e2e`` and sizes its variants as it says."""

from __future__ import annotations

import json

from loramix.cli import main


def test_e2e_bench_quick_times_and_sizes_variants(tmp_path):
    variants = "lora,more_eq,more_matched"
    assert main(["bench", "e2e", "--quick", "--variants", variants, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "e2e_bench_quick.json").read_text())
    rows = {row["name"]: row for row in report["variants"]}
    assert sorted(rows) == ["lora", "more_eq", "more_matched", "peft_lora"]  # PEFT LoRA always runs
    for row in rows.values():
        assert len(row["runs"]) == 1 and row["step_ms"] > 0 and row["peak_mib"] > 0
    peft, lora = rows["peft_lora"], rows["lora"]
    assert peft["step_ratio"] == 1.0
    # loramix lora and PEFT LoRA at the same rank train the same number of parameters
    assert lora["trainable"] == peft["trainable"] == report["reference_trainable"]
    # MoRE's per-layer selector makes it larger than PEFT at equal rank; the matched size comes back near PEFT
    assert rows["more_eq"]["trainable"] > 1.3 * peft["trainable"]
    assert rows["more_matched"]["config"]["r"] < rows["more_eq"]["config"]["r"]
    assert abs(rows["more_matched"]["params_ratio"] - 1) < 0.1
    # the exact memory figures: the same trainable parameters under AdamW hold the same state, four float32
    # copies of each parameter (itself, its gradient, two moments) and one step count per tensor
    assert peft["state_mib"] == lora["state_mib"]
    assert 16 * lora["trainable"] <= lora["state_mib"] * 2**20 <= 1.01 * 16 * lora["trainable"]
    # for the backward, loramix's LoRA keeps what PEFT's keeps (the layer input and the rank-r activation);
    # MoRE keeps more (its selector's and contrastive loss's tensors)
    assert 0 < lora["saved_mib"] == peft["saved_mib"]
    assert rows["more_eq"]["saved_mib"] > lora["saved_mib"]
    assert "python benchmarks/e2e_bench.py --quick" in (tmp_path / "e2e_bench_quick.md").read_text()
