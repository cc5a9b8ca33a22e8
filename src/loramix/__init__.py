"""loramix: multi-task fine-tuning of transformers with mixtures of low-rank (LoRA) experts."""

__version__ = "0.2.0"

from loramix.config import ConfigError, MixtureConfig  # noqa: E402
from loramix.layer import MixtureLinear  # noqa: E402
from loramix.methods import available_methods, get_method  # noqa: E402
from loramix.model import MixtureModel, get_mixture_model  # noqa: E402

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
