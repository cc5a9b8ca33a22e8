"""Run by torchrun in the distributed tests: train the tiny causal LM and write losses and weights as JSON.

Usage: ``dist_worker.py OUTPUT_DIR RESULT_JSON METHOD [METHOD ...]``; the engine comes from the environment
(``ACCELERATE_USE_FSDP``/``FSDP_VERSION`` as ``accelerate launch --config_file`` sets them, DDP otherwise).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from generation_fixtures import causal_lm, generation_examples, generation_factory
from loramix.train import Trainer, TrainingSettings
from loramix.train.checkpoint import gather_adapter_state

STEPS = 3
BATCH = 4


def main() -> None:
    output, result_file, methods = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    examples = generation_examples(32)
    results = {}
    for method in methods:
        settings = TrainingSettings(
            max_steps=STEPS,
            batch_size=BATCH,
            learning_rate=1e-2,
            progress_bar=False,
            mixed_precision="no",
            use_cpu=True,
        )
        model = causal_lm(method)
        trainer = Trainer(model, settings, generation_factory(examples, BATCH), output / method)
        state = trainer.train()
        weights = gather_adapter_state(model)
        results[method] = {
            "losses": [record["loss"] for record in state.history],
            "aux": [record.get("aux_contrastive") for record in state.history],
            "weights": {key: value.tolist() for key, value in weights.items()},
            "world": trainer.accelerator.num_processes,
            "engine": trainer.accelerator.distributed_type.name,
        }
    if trainer.accelerator.is_main_process:
        result_file.write_text(json.dumps(results))


if __name__ == "__main__":
    main()
