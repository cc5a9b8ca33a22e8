"""One task of a mixture as files any server reads: a PEFT LoRA adapter at one rank, or a merged model.

A task whose routing depends on the task alone is a fixed low-rank change of each adapted layer,
``B_t A_t`` (see :meth:`loramix.layer.MixtureLinear.task_factors`). :func:`export_task` writes it as a
standard PEFT LoRA adapter that PEFT, transformers, vLLM and LoRAX load as they are:

- every layer at one rank R (the task's largest rank over the layers; smaller layers are padded with zero
  rows of A and zero columns of B, which changes no output), ``lora_alpha == r`` (the scale is folded into
  B), so no ``rank_pattern``/``alpha_pattern`` is needed to read it right;
- ``task_type`` from the base model's class (``CAUSAL_LM``, ``SEQ_CLS``, ...), the shortest standard target
  module names that match exactly the adapted layers (``q_proj``), and no ``modules_to_save`` for causal LMs
  unless the mixture trains some;
- ``loramix_export.json`` beside it: the task, the rank, each layer's own rank and the ``--max-lora-rank``
  vLLM needs.

``minimal_rank=True`` keeps each layer at its own rank (PEFT reads it through ``rank_pattern``; servers
that ignore ``rank_pattern`` do not). A task of a :class:`~loramix.heads.MultiTaskSequenceClassifier`
exports onto the architecture's ``AutoModelForSequenceClassification`` with the task's head as its
``classifier``. Every writer stages its files in a sibling directory and renames it into place, so a failed
export leaves nothing behind, and refuses a non-empty output directory unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from loramix.heads import MultiTaskSequenceClassifier
from loramix.layer import MixtureLinear
from loramix.version import __version__

if TYPE_CHECKING:
    from loramix.model import MixtureModel

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
EXPORT_INFO_NAME = "loramix_export.json"
MANIFEST_NAME = "loramix_exports.json"
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (``LoRAConfig``); an adapter of rank r needs one >= r."""

_TASK_TYPES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts for an adapter of rank ``rank`` (``None``: too large)."""
    return next((allowed for allowed in VLLM_MAX_LORA_RANKS if allowed >= rank), None)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from the Auto class that builds its class.

    ``LlamaForCausalLM`` gives ``"CAUSAL_LM"``, ``T5ForConditionalGeneration`` ``"SEQ_2_SEQ_LM"``,
    ``BertForSequenceClassification`` ``"SEQ_CLS"``, ``BertModel`` ``"FEATURE_EXTRACTION"``; a class no
    Auto class builds gives ``None``.
    """
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    for mapping_name, task_type in _TASK_TYPES:
        mapping = getattr(modeling_auto, mapping_name, {})
        for value in mapping.values():
            if name == value or (isinstance(value, (tuple, list)) and name in value):
                return task_type
    return None


def short_target_names(module_names: Sequence[str], adapted: Sequence[str]) -> list[str]:
    """The shortest module-name suffixes that select exactly the ``adapted`` modules among ``module_names``.

    A suffix is kept when every module it matches (PEFT's rule: the name equals it or ends with ``.`` + it)
    is adapted, so ``q_proj`` stands for all the ``...self_attn.q_proj`` layers while BERT's
    ``attention.output.dense`` does not become ``dense`` (which would also match the pooler).

    Args:
        module_names: every module name of the model the adapter goes on.
        adapted: the names of the adapted modules.

    Returns:
        The suffixes, sorted.
    """
    wanted = set(adapted)
    chosen: set[str] = set()
    for name in sorted(wanted):
        if any(name == suffix or name.endswith("." + suffix) for suffix in chosen):
            continue
        parts = name.split(".")
        for length in range(1, len(parts) + 1):
            suffix = ".".join(parts[-length:])
            matches = {other for other in module_names if other == suffix or other.endswith("." + suffix)}
            if matches <= wanted:
                chosen.add(suffix)
                break
        else:
            chosen.add(name)
    return sorted(chosen)


# ---------------------------------------------------------------------------------------------- output dirs
def _protected(directory: Path, protect: Sequence[str | Path]) -> Path | None:
    target = directory.resolve()
    for path in protect:
        kept = Path(path).resolve()
        if kept == target or target in kept.parents:
            return kept
    return None


def check_output_dir(directory: str | Path, overwrite: bool = False, protect: Sequence[str | Path] = ()) -> Path:
    """Refuse an output directory that would lose files: checked before anything is computed or written.

    Args:
        directory: where an export will go.
        overwrite: allow replacing a non-empty directory.
        protect: directories never replaced, even with ``overwrite`` (the adapter being exported).

    Returns:
        The directory as a ``Path``.

    Raises:
        FileExistsError: the path is a file, holds a protected directory, or is a non-empty directory and
            ``overwrite`` is false.
    """
    directory = Path(directory)
    kept = _protected(directory, protect)
    if kept is not None:
        raise FileExistsError(
            f"output {directory} would replace the adapter being exported ({kept}); choose another directory"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"output {directory} is a file, not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {directory} is not empty; choose another directory or pass overwrite=True "
            "(--overwrite) to replace it"
        )
    return directory


@contextlib.contextmanager
def staged_directory(
    directory: str | Path, overwrite: bool = False, protect: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Write a directory all at once: the ``with`` block fills a hidden sibling, renamed into place at the end.

    If the block raises, the sibling is removed and ``directory`` is left as it was. With ``overwrite`` a
    non-empty directory is replaced (moved aside, then deleted once the new one is in place).

    Yields:
        The empty staging directory to write into.

    Raises:
        FileExistsError: see :func:`check_output_dir`.
    """
    directory = check_output_dir(directory, overwrite, protect)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        yield staging
        check_output_dir(directory, overwrite, protect)  # nothing appeared there while we wrote
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        if directory.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".replaced", dir=directory.parent))
            os.replace(directory, aside / "old")
            try:
                os.replace(staging, directory)
            except OSError:
                os.replace(aside / "old", directory)  # put the old directory back
                raise
            finally:
                if not (aside / "old").exists() or directory.exists():
                    shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- adapters
def _json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _task_name(mixture: MixtureModel, task: int) -> str:
    names = mixture.mixture_config.task_names
    return names[task] if names else str(task)


def _plain_module_names(model: nn.Module) -> list[str]:
    """Module names of ``model`` as the plain model has them (an adapted layer's own parts left out)."""
    names: list[str] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        names.append(name)
        if isinstance(module, MixtureLinear):
            inside.append(name + ".")
    return names


class _Target:
    """Where an export goes: the plain model's module names and the renaming of the mixture's names."""

    def __init__(self, mixture: MixtureModel) -> None:
        base = mixture.base_model
        self.classifier = isinstance(base, MultiTaskSequenceClassifier)
        if self.classifier:
            from transformers import AutoModelForSequenceClassification

            if base.pooling != "pooler":
                raise ValueError(
                    "this classifier mean-pools its encoder's tokens, which no transformers sequence-classification "
                    "class does, so its tasks cannot export; train it with pooling='pooler' (recipes: "
                    "model.pooling: pooler)"
                )
            try:
                self.model_class = AutoModelForSequenceClassification._model_mapping[type(base.config)]
            except KeyError:
                raise ValueError(
                    f"transformers has no sequence-classification class for {type(base.config).__name__}"
                ) from None
            self.prefix = self.model_class.base_model_prefix
            self.task_type = "SEQ_CLS"
            encoder_names = _plain_module_names(base.encoder)
            self.module_names = [self.prefix, *(f"{self.prefix}.{name}" for name in encoder_names)]
            self.module_names += ["dropout", "classifier"]
        else:
            self.task_type = peft_task_type(base)
            self.module_names = _plain_module_names(base)

    def rename(self, name: str) -> str:
        """The module name in the plain model of a module name of the wrapped model."""
        if not self.classifier:
            return name
        if name.startswith("encoder."):
            return f"{self.prefix}.{name[len('encoder.') :]}"
        if name == "encoder":
            return self.prefix
        raise ValueError(f"module {name!r} of the classifier has no place in {self.model_class.__name__}")


# Heads that PEFT's task classes always train and save, so always expect in an adapter of that task type.
_PEFT_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def _saved_modules(mixture: MixtureModel, target: _Target, task: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The ``modules_to_save`` of an export and their tensors (a classifier's task head as ``classifier``).

    PEFT's task classes (``SEQ_CLS``, ...) load their head from the adapter whether or not it was trained,
    so a base model's own head goes in too.
    """
    names: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(mixture._modules_to_save())
    if not target.classifier:
        adapted = set(mixture.mixture_layers())
        for head in _PEFT_HEADS.get(target.task_type or "", ()):
            module = getattr(mixture.base_model, head, None)
            if isinstance(module, nn.Module) and head not in adapted and head not in modules:
                if not any(name == head or name.endswith("." + head) for name in modules):
                    modules[head] = module
    for name, module in modules.items():
        if target.classifier and name == "heads":
            head = module[task]
            pooler = f"{target.prefix}.pooler"
            for part, module_name in ((head.classifier, "classifier"), (head.pooler, pooler)):
                names.append(module_name.rsplit(".", 1)[-1])
                for key, value in part.state_dict().items():
                    tensors[f"base_model.model.{module_name}.{key}"] = value.detach().contiguous().cpu()
            continue
        name = target.rename(name)
        names.append(name)
        for key, value in module.state_dict().items():
            tensors[f"base_model.model.{name}.{key}"] = value.detach().contiguous().cpu()
    return names, tensors


def write_adapter(
    mixture: MixtureModel,
    directory: Path,
    task: int,
    minimal_rank: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Write task ``task`` as a PEFT LoRA adapter into the existing empty ``directory`` (no staging).

    Returns:
        The export record also written to ``loramix_export.json``.

    Raises:
        ValueError: the task uses no adapter component in any layer.
    """
    from peft import LoraConfig

    target = _Target(mixture)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    fan_in_fan_out = False
    with torch.no_grad():
        for name, layer in mixture.mixture_layers().items():
            factor_a, factor_b = layer.task_factors(task)
            factors[target.rename(name)] = (factor_a.detach(), factor_b.detach())
            fan_in_fan_out = fan_in_fan_out or layer.fan_in_fan_out
    ranks = {name: int(pair[0].shape[0]) for name, pair in factors.items()}
    if not any(ranks.values()):
        raise ValueError(f"task {task!r} uses no adapter component in any layer; nothing to export")
    top_rank = max(ranks.values())
    if minimal_rank:
        factors = {name: pair for name, pair in factors.items() if ranks[name]}
    tensors: dict[str, torch.Tensor] = {}
    for name, (factor_a, factor_b) in factors.items():
        rank = factor_a.shape[0]
        if not minimal_rank and rank < top_rank:
            factor_a = torch.cat([factor_a, factor_a.new_zeros(top_rank - rank, factor_a.shape[1])])
            factor_b = torch.cat([factor_b, factor_b.new_zeros(factor_b.shape[0], top_rank - rank)], dim=1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = factor_a.contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = factor_b.contiguous().cpu()
    saved_names, saved_tensors = _saved_modules(mixture, target, task)
    tensors.update(saved_tensors)
    options: dict[str, Any] = {}
    if minimal_rank:
        kept = {name: rank for name, rank in ranks.items() if rank}
        options["target_modules"] = sorted(kept)
        options["rank_pattern"] = {f"^{re.escape(name)}$": rank for name, rank in kept.items()}
        options["alpha_pattern"] = dict(options["rank_pattern"])
    else:
        options["target_modules"] = short_target_names(target.module_names, list(factors))
    base_name = base_model_name_or_path or mixture.mixture_config.base_model_name_or_path
    peft_config = LoraConfig(
        r=top_rank,
        lora_alpha=top_rank,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type=target.task_type,
        modules_to_save=saved_names or None,
        base_model_name_or_path=base_name,
        **options,
    )
    peft_config.save_pretrained(str(directory))
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    uniform = minimal_rank is False or len(set(options["rank_pattern"].values())) == 1
    record = {
        "format": "peft_lora",
        "loramix_version": __version__,
        "method": mixture.mixture_config.method,
        "task": _task_name(mixture, task),
        "task_id": task,
        "task_type": target.task_type,
        "rank": top_rank,
        "uniform_rank": uniform,
        "layer_ranks": ranks,
        "base_model_name_or_path": base_name,
        "modules_to_save": saved_names,
        "vllm": {
            "max_lora_rank": vllm_max_lora_rank(top_rank),
            "loadable": uniform and not (target.task_type == "CAUSAL_LM" and saved_names),
        },
    }
    _json(directory / EXPORT_INFO_NAME, record)
    return record


def _probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(5, vocab - 1), min(vocab, 1000), (2, 8), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, -3:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def task_classifier(mixture: MixtureModel, task: int, id2label: dict[int, str] | None = None) -> nn.Module:
    """Task ``task`` of a mixture over a :class:`MultiTaskSequenceClassifier` as a merged
    ``AutoModelForSequenceClassification``, checked to give the mixture's logits on a probe batch.

    Raises:
        ValueError: the architecture's class does not give the mixture's logits.
    """
    merged = mixture.merge(task)
    model = merged.task_model(task, id2label)
    inputs = {key: value.to(mixture._device()) for key, value in _probe_inputs(model).items()}
    was_training = mixture.training
    mixture.eval()
    try:
        with torch.no_grad():
            expected = mixture(**inputs, task_ids=torch.full((2,), task)).logits[:, : model.config.num_labels]
            got = model(**inputs).logits
    finally:
        mixture.train(was_training)
    tolerance = 1e-4 if got.dtype == torch.float32 else 5e-2  # half precision rounds differently per order
    if not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=tolerance):
        raise ValueError(
            f"{type(model).__name__} does not pool as the mixture's classifier (logits differ by "
            f"{(got - expected).abs().max().item():.3g}); this architecture's tasks cannot export"
        )
    return model


def export_task(
    mixture: MixtureModel,
    directory: str | Path,
    task: int | str,
    minimal_rank: bool = False,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    protect: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Write one task as a standard PEFT LoRA adapter (see the module's description).

    Args:
        mixture: the mixture; its routing must depend on the task alone.
        directory: the output directory (created; must be empty unless ``overwrite``).
        task: the task's id or name.
        minimal_rank: keep each layer at its own rank (``rank_pattern``; PEFT only) instead of one rank.
        overwrite: replace a non-empty ``directory``.
        base_model_name_or_path: recorded in ``adapter_config.json`` (default: the mixture config's).
        protect: directories never replaced (the adapter being exported).

    Returns:
        The export record (``loramix_export.json``).

    Raises:
        TypeError: the method routes on the input. ValueError: unknown task, or the task uses nothing.
        FileExistsError: the output directory is refused (nothing is written).
    """
    mixture._require_mergeable()
    task_id = mixture.mixture_config.task_index(task)
    check_output_dir(directory, overwrite, protect)
    _Target(mixture)
    with staged_directory(directory, overwrite, protect) as staging:
        return write_adapter(mixture, staging, task_id, minimal_rank, base_model_name_or_path)


def write_merged(
    mixture: MixtureModel, directory: Path, task: int, id2label: dict[int, str] | None = None
) -> dict[str, Any]:
    """Write task ``task`` folded into the base weights as a plain transformers model (no staging).

    A classifier's task is saved as its ``AutoModelForSequenceClassification``; any other model as the
    wrapped model's own class.

    Returns:
        The record also written to ``loramix_export.json``.
    """
    if isinstance(mixture.base_model, MultiTaskSequenceClassifier):
        model = task_classifier(mixture, task, id2label)
    else:
        model = mixture.merge(task)
    model.save_pretrained(str(directory))
    record = {
        "format": "merged",
        "loramix_version": __version__,
        "method": mixture.mixture_config.method,
        "task": _task_name(mixture, task),
        "task_id": task,
        "model_class": type(model).__name__,
    }
    _json(directory / EXPORT_INFO_NAME, record)
    return record


def save_merged_task(
    mixture: MixtureModel,
    directory: str | Path,
    task: int | str,
    overwrite: bool = False,
    id2label: dict[int, str] | None = None,
    protect: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Save one task folded into the base weights (staged; refuses a non-empty directory unless ``overwrite``).

    Raises:
        TypeError: the method routes on the input. FileExistsError: the output directory is refused.
    """
    mixture._require_mergeable()
    task_id = mixture.mixture_config.task_index(task)
    check_output_dir(directory, overwrite, protect)
    with staged_directory(directory, overwrite, protect) as staging:
        return write_merged(mixture, staging, task_id, id2label)


def task_directory_names(task_names: Sequence[str]) -> list[str]:
    """A safe, distinct directory name for each task (path-like names never leave the output directory)."""
    names: list[str] = []
    for index, task in enumerate(task_names):
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("._") or f"task{index}"
        names.append(safe if safe not in names else f"{safe}-{index}")
    return names


def export_all_tasks(
    mixture: MixtureModel,
    directory: str | Path,
    write: Callable[[Path, int], dict[str, Any]],
    overwrite: bool = False,
    protect: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Write every task into its own subdirectory of ``directory`` with a manifest (``loramix_exports.json``).

    Args:
        mixture: the mixture.
        directory: the output directory (staged as a whole: all tasks or nothing).
        write: writes one task into an empty directory and returns its record (:func:`write_adapter` or
            :func:`write_merged` with their options bound).
        overwrite: replace a non-empty ``directory``.
        protect: directories never replaced.

    Returns:
        The manifest: ``{"tasks": {task: subdirectory}, "records": {task: record}}``.
    """
    mixture._require_mergeable()
    check_output_dir(directory, overwrite, protect)
    names = [_task_name(mixture, task) for task in range(mixture.mixture_config.num_tasks)]
    folders = task_directory_names(names)
    manifest: dict[str, Any] = {"tasks": {}, "records": {}}
    with staged_directory(directory, overwrite, protect) as staging:
        for task, (name, folder) in enumerate(zip(names, folders, strict=True)):
            (staging / folder).mkdir()
            manifest["records"][name] = write(staging / folder, task)
            manifest["tasks"][name] = folder
        ranks = [record.get("rank") for record in manifest["records"].values() if record.get("rank")]
        if ranks:
            manifest["vllm_max_lora_rank"] = vllm_max_lora_rank(max(ranks))
        _json(staging / MANIFEST_NAME, manifest)
    return manifest
