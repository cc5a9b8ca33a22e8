"""``more``: MoRE, Mixture of Low-Rank Experts (arXiv 2505.22694).

Each adapted layer holds one LoRA of maximum rank R (``config.r``); its experts are the nested rank
prefixes: expert k uses components 1..k. A per-layer adaptive rank selector picks one candidate rank per
task::

    p_t = softmax(W_g e_t + b_g)                 over the candidate ranks (e_t: row t of a task table)
    k_t = argmax p_t                             (hard choice)
    ĝ   = p_t[k_t] - stopgrad(p_t[k_t]) + 1      (straight-through: value 1, gradient of p_t[k_t])
    g   = prefix_mask(k_t) · ĝ · w               (w = 1; with linear scaling w_i = (i / R)², i = 1..R)
    h   = W0 x + s · B diag(g) A x

and a contrastive loss (InfoNCE) pulls each sequence's pooled layer input towards its own task's
embedding: ``CE(cos(pool(x), E) / τ, t)``, appended to ``context.aux_losses["contrastive"]`` (the model
averages it over layers and adds ``λ ·`` it to ``outputs.loss``; λ = ``aux_loss_weight``, default 0.1).

Decisions loramix makes (documented, differing from the release where its code was defective):

- **The chosen rank is a deterministic function of saved parameters**: ``k_t = argmax(W_g e_t + b_g)``
  (or of the logit table without task embeddings). No buffer holds it: it is recomputed at every
  forward from the weights that ``save_pretrained`` writes bit for bit, so training, a reloaded model,
  a merged model and an exported adapter all use the same rank. The selector really trains: its
  straight-through gradient moves ``p_t[k_t]`` and the argmax can change during training.
- **Linear scaling is off by default** (``linear_scaling: true`` restores the release's form: A's row i
  and B's column i both scaled by i/R, i.e. component i weighs (i/R)²). The weights shrink a rank-k
  prefix's delta to s · Σ_{i≤k} (i/R)² (0.47 s at k = 4 of R = 8) against s per component for a LoRA,
  so under Adam's fixed step sizes MoRE's function moves several times more slowly. Measured
  (``benchmarks/results/suites_findings.md``): on the interference suite (SmolLM2, two target rules over
  the same inputs) linear scaling left MoRE fitting one rule only, about 29 points below MoRE without it
  on every seed; on the MiniLM classification table at lr 1e-3 it cost 2.7 points (positive on all three
  seeds) and needed a 3x learning rate to catch up. Adapters saved before this default changed and
  relying on it must now say ``linear_scaling: true``.
- **Contrastive pooling**: ``"first"`` (the layer input at the first token, as the release, for
  encoders) or ``"mean"`` (mean over non-pad tokens; use it for decoders, whose first token is BOS). The
  loss is computed in training mode only.
- ``task_gate(t)`` is the forward's gate with ĝ = 1, so ``merge`` and ``export`` give the rank-k_t
  delta ``s · B[:, :k_t] diag(w) A[:k_t]`` that the forward uses.

Options (``method_options``), with their defaults:

- ``candidate_ranks`` (all of 1..R): the ranks the selector chooses among, e.g. ``[1, 2, 4, 8]``.
- ``linear_scaling`` (false): weigh component i by (i/R)², as MoRE's release does.
- ``task_embedding`` (true): off, the gate is a learned per-task logit table (T × candidates), with no
  embedding and so no contrastive loss.
- ``contrastive`` (same as ``task_embedding``): add the contrastive loss.
- ``straight_through`` (true): off, a soft mixture ``Σ_k p_t[k] · prefix_mask(k)`` with no hard choice
  (still a function of the task alone, so it merges, at rank R).
- ``temperature`` (0.05): τ of the contrastive loss.
- ``contrastive_pooling`` (``"first"``): ``"first"`` or ``"mean"``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from loramix.checks import ConfigError
from loramix.context import RoutingContext
from loramix.gating import POOLINGS, pool_sequences, straight_through
from loramix.methods.base import Method, register_method
from loramix.methods.options import MethodOptions, option
from loramix.mixers import Mixer, Router

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@dataclass(frozen=True)
class MoREOptions(MethodOptions):
    """MoRE's ``method_options`` (see the module docstring); after parsing every field is filled in."""

    candidate_ranks: tuple[int, ...] | None = option(None, low=1)
    linear_scaling: bool = False
    task_embedding: bool = True
    contrastive: bool | None = None
    straight_through: bool = True
    temperature: float = option(0.05, above=0)
    contrastive_pooling: str = option("first", choices=POOLINGS)

    def resolve(self, method: str, config: MixtureConfig) -> MoREOptions:
        ranks = tuple(range(1, config.r + 1)) if self.candidate_ranks is None else self.candidate_ranks
        if max(ranks) > config.r or len(set(ranks)) != len(ranks):
            self.fail(method, "candidate_ranks", list(ranks), f"a non-empty list of distinct ranks in 1..r={config.r}")
        contrastive = self.task_embedding if self.contrastive is None else self.contrastive
        if contrastive and not self.task_embedding:
            self.fail(method, "contrastive", contrastive, "false when task_embedding is false")
        return dataclasses.replace(self, candidate_ranks=tuple(sorted(ranks)), contrastive=contrastive)


class RankSelectorRouter(Router):
    """MoRE's adaptive rank selector over nested rank prefixes of one rank-R LoRA.

    Args:
        num_tasks: T.
        in_features: d_in of the adapted layer (width of the task embeddings).
        rank: R, the LoRA's maximum rank (the number of gate components).
        options: the method's validated options.

    Attributes:
        prefix_masks: FloatTensor[candidates, R], row j is 1 on the first ``candidate_ranks[j]`` components.
        component_scaling: FloatTensor[R], (i/R)² with linear scaling, else ones.
    """

    def __init__(self, num_tasks: int, in_features: int, rank: int, options: MoREOptions) -> None:
        super().__init__(rank)
        self.options = options
        ranks = torch.tensor(options.candidate_ranks)
        self.register_buffer("candidate_ranks", ranks, persistent=False)
        prefix_masks = (torch.arange(rank)[None, :] < ranks[:, None]).float()
        self.register_buffer("prefix_masks", prefix_masks, persistent=False)
        scaling = (torch.arange(1, rank + 1) / rank) ** 2 if options.linear_scaling else torch.ones(rank)
        self.register_buffer("component_scaling", scaling.float(), persistent=False)
        if options.task_embedding:
            self.task_embedding = nn.Parameter(torch.randn(num_tasks, in_features) * 0.01)
            self.gate = nn.Linear(in_features, len(options.candidate_ranks))
        else:
            self.task_logits = nn.Parameter(torch.randn(num_tasks, len(options.candidate_ranks)) * 0.01)

    def rank_probabilities(self) -> torch.Tensor:
        """p_t of every task over the candidate ranks, FloatTensor[T, candidates]."""
        logits = self.gate(self.task_embedding) if self.options.task_embedding else self.task_logits
        return torch.softmax(logits, dim=-1)

    def chosen_ranks(self) -> torch.Tensor:
        """The rank k_t each task uses (argmax of p_t), LongTensor[T]; with a soft mixture, R for all."""
        if not self.options.straight_through:
            count = self.rank_probabilities().shape[0]
            return torch.full((count,), self.num_components, dtype=torch.long, device=self.candidate_ranks.device)
        return self.candidate_ranks[self.rank_probabilities().argmax(dim=-1)]

    def task_gates(self) -> torch.Tensor:
        """The gate of every task, FloatTensor[T, R] (straight-through value 1 on the chosen prefix)."""
        probs = self.rank_probabilities()
        if self.options.straight_through:
            choice = probs.argmax(dim=-1)
            chosen = probs.gather(-1, choice[:, None])
            gates = self.prefix_masks[choice] * straight_through(chosen)
        else:
            gates = probs @ self.prefix_masks
        # component_scaling is all ones without linear scaling: skip the product (and its backward) per layer
        return gates * self.component_scaling if self.options.linear_scaling else gates

    def contrastive_loss(self, x: torch.Tensor, tasks: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """InfoNCE between pooled sequences and the task embeddings.

        Args:
            x: FloatTensor[batch, seq, d_in], the layer input.
            tasks: LongTensor[batch].
            context: supplies the attention mask for ``"mean"`` pooling.

        Returns:
            Scalar ``CE(cos(pool(x), E) / τ, tasks)``.
        """
        mask = context.mask_for(x.shape[0], x.shape[1]) if x.dim() == 3 else None
        pooled = pool_sequences(x, mask, self.options.contrastive_pooling).to(self.task_embedding.dtype)
        cosine = F.normalize(pooled, dim=-1) @ F.normalize(self.task_embedding, dim=-1).T
        return F.cross_entropy(cosine / self.options.temperature, tasks)

    def route(self, x: torch.Tensor, context: RoutingContext) -> torch.Tensor:
        """Gate FloatTensor[batch, R] for x of shape [batch, ..., d_in]; each row uses its own task's gate."""
        tasks = context.task_ids_for(x.shape[0])
        if self.training and self.options.contrastive:
            context.aux_losses["contrastive"].append(self.contrastive_loss(x, tasks, context))
        return self.task_gates()[tasks].to(x.dtype)

    def task_gate(self, task: int) -> torch.Tensor:
        return self.task_gates()[task].detach()


@register_method
class MoRE(Method):
    """MoRE: nested rank-prefix experts of one rank-R LoRA, an adaptive rank selector per layer and task."""

    name = "more"
    Options = MoREOptions
    default_aux_loss_weight = 0.1

    @classmethod
    def validate(cls, config: MixtureConfig) -> None:
        if config.num_experts != 1:
            raise ConfigError(
                f"MixtureConfig.num_experts={config.num_experts} is invalid: 'more' has one LoRA of rank r "
                "whose experts are its rank prefixes (choose them with method_options['candidate_ranks'])"
            )
        cls.options(config)

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return RankSelectorRouter(config.num_tasks, in_features, config.r, cls.options(config))
