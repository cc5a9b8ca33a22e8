"""``melora``: MELoRA, mini-ensemble low-rank adapters (arXiv 2402.17263).

n mini LoRAs (n = ``num_experts``) sit on the diagonal blocks of W: the input and the output are split into
n equal slices, and mini LoRA i (rank r = ``config.r``) maps input slice i to output slice i::

    h[slice_i] = W0 x [slice_i] + s · B_i A_i x[slice_i]       A_i: r × d_in/n,  B_i: d_out/n × r

so ΔW = s · blockdiag(B_1 A_1, …, B_n A_n) has rank up to n·r for the parameters of one rank-r LoRA. No
router: the mixer is the identity, and every task shares the delta, which merges and exports as a plain
LoRA of rank n·r (the block-diagonal A and B written out densely).

In bank form the banks are block-diagonal (``bank_blocks = n``): the layer keeps only the blocks, A as
[n·r, d_in/n] and B as [d_out/n, n·r], and computes the two block-diagonal products with one einsum each.
Decisions: each mini LoRA is scaled like a LoRA of rank r, s = ``lora_alpha / r`` (so n = 1 is exactly
``lora``), and each block's A is Kaiming-uniform over its own fan-in d_in/n, B zero. The dimensions of
every adapted layer must be divisible by n (checked when the model is wrapped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from loramix.methods.base import Method, register_method
from loramix.mixers import Mixer
from loramix.routers import ConstantRouter

if TYPE_CHECKING:
    from loramix.config import MixtureConfig


@register_method
class MELoRA(Method):
    """MELoRA: ``num_experts`` mini LoRAs of rank r on the diagonal blocks of each adapted weight."""

    name = "melora"

    @classmethod
    def bank_blocks(cls, config: MixtureConfig) -> int:
        return config.num_experts

    @classmethod
    def make_mixer(cls, config: MixtureConfig, in_features: int, out_features: int) -> Mixer:
        return ConstantRouter(config.r * config.num_experts)
