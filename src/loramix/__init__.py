"""loramix: multi-task fine-tuning of transformers with mixtures of low-rank (LoRA) experts."""

from loramix.config import ConfigError, MixtureConfig
from loramix.layer import MixtureLinear
from loramix.methods import available_methods, get_method
from loramix.model import MixtureModel, get_mixture_model
from loramix.version import __version__

__all__ = [
    "ConfigError",
    "MixtureConfig",
    "MixtureLinear",
    "MixtureModel",
    "__version__",
    "available_methods",
    "get_mixture_model",
    "get_method",
]
