"""Run by torchrun in the distributed tests: train the tiny causal LM and write losses and weights as JSON.

Usage: ``dist_worker.py OUTPUT_DIR RESULT_JSON METHOD [METHOD ...] [--resume-check] [--accumulation=N]``
(``N`` micro-batches of ``4 / N`` rows per process and step, 1 by default); the engine comes from the
environment (``ACCELERATE_USE_FSDP``/``FSDP_VERSION``, ``ACCELERATE_USE_DEEPSPEED``/``ACCELERATE_DEEPSPEED_ZERO_STAGE``
as ``accelerate launch --config_file`` sets them, DDP otherwise). ``--resume-check`` also trains the first method
again with a crash after step 2's checkpoint, then resumes it with a fresh model and trainer, and reports the
resumed run's losses and weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import distributed

from generation_fixtures import causal_lm, generation_examples, generation_factory
from loramix.train import Trainer, TrainingSettings
from loramix.train.checkpoint import gather_adapter_state, model_is_sharded

STEPS = 3
BATCH = 4


class Crash(RuntimeError):
    """The injected failure."""


def _crash_at_two(state) -> None:
    if state.global_step == 2:
        raise Crash("injected after step 2")


def _settings(**overrides) -> TrainingSettings:
    values = {"max_steps": STEPS, "batch_size": BATCH, "learning_rate": 1e-2, "progress_bar": False}
    accumulation = overrides.pop("accumulation", 1)
    values.update(batch_size=BATCH // accumulation, gradient_accumulation_steps=accumulation)
    return TrainingSettings(**{**values, "mixed_precision": "no", "use_cpu": True, **overrides})


def main() -> None:
    resume_check = "--resume-check" in sys.argv
    accumulation = next((int(arg.split("=")[1]) for arg in sys.argv if arg.startswith("--accumulation=")), 1)
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    output, result_file, methods = Path(arguments[0]), Path(arguments[1]), arguments[2:]
    examples = generation_examples(32)
    batch = BATCH // accumulation
    results = {}
    for method in methods:
        settings = _settings(accumulation=accumulation)
        model = causal_lm(method)
        trainer = Trainer(model, settings, generation_factory(examples, batch), output / method)
        state = trainer.train()
        weights = gather_adapter_state(model)
        results[method] = {
            "losses": [record["loss"] for record in state.history],
            "aux": [record.get("aux_contrastive") for record in state.history],
            "grad_norms": [record["grad_norm"] for record in state.history],
            "weights": {key: value.tolist() for key, value in weights.items()},
            "sharded": model_is_sharded(model),
            # ZeRO-3 keeps parameters under its persistence threshold whole on every rank
            "partitioned": sum(getattr(param, "ds_persist", True) is False for param in model.parameters()),
            "parameters": sum(1 for _ in model.parameters()),
            "world": trainer.accelerator.num_processes,
            "engine": trainer.accelerator.distributed_type.name,
        }
    if resume_check:
        method, directory, factory = methods[0], output / "crashed", generation_factory(examples, batch)
        settings = _settings(save_every=2, accumulation=accumulation)
        try:
            Trainer(causal_lm(method), settings, factory, directory, callbacks=[_crash_at_two]).train()
        except Crash:
            pass
        model = causal_lm(method)
        trainer = Trainer(model, settings, factory, directory)
        state = trainer.train(resume_from=True)
        results["resumed"] = {
            "losses": [record["loss"] for record in state.history],
            "weights": {key: value.tolist() for key, value in gather_adapter_state(model).items()},
        }
    if trainer.accelerator.is_main_process:
        result_file.write_text(json.dumps(results))
    # Leave the process group before the interpreter exits: gloo's threads torn down at exit abort a rank now
    # and then ("terminate called without an active exception"), and the run then fails after it succeeded.
    trainer.accelerator.wait_for_everyone()
    distributed.destroy_process_group()


if __name__ == "__main__":
    main()
