"""``moelora``: MOELoRA (arXiv 2310.18339), experts mixed by a task-conditioned softmax gate.

Each adapted layer holds E experts of rank r (``r`` is the rank of one expert: MOELoRA's total rank
``r * E``), a task embedding table (width ``method_options["task_embedding_dim"]``, default 64) and a gate
``softmax(W_g e_t)``;
``h = W0 x + s Σ_i g_i(t) B_i A_i x``. The gate depends on the task alone, so each task merges.
loramix gives every adapted layer its own embedding and gate (the release's per-module layout), and keeps
the ordinary (batch, seq, hidden) layout of any model (the release hard-coded ChatGLM's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loramix.checks import MAX_SIZE
from loramix.methods.base import Method, register_method
from loramix.methods.options import MethodOptions, option
from loramix.mixers import Mixer
from loramix.routers import TaskSoftmaxRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class MOELoRAOptions(MethodOptions):
    """MOELoRA's ``method_options``: the width of the task embedding."""

    task_embedding_dim: int = option(64, low=1, high=MAX_SIZE)


@register_method
class MOELoRA(Method):
    """MOELoRA: task-gated mixture of E LoRA experts."""

    name = "moelora"
    Options = MOELoRAOptions

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        width = cls.options(config).task_embedding_dim
        return TaskSoftmaxRouter(config.num_tasks, config.num_experts, config.r, width)
