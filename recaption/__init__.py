"""recaption: re-caption image datasets with multimodal LLMs at cluster scale, and train long-text CLIP models on the
result. The Python API (`recaption.api`): load a config, plan or run it, caption a Ray Dataset, read an output back."""

from recaption.api import caption, load_config, plan, read_output, read_output_hf, run
from recaption.errors import ConfigError, InputError, RecaptionError

__version__ = "0.1.0"
__all__ = [
    "ConfigError",
    "InputError",
    "RecaptionError",
    "__version__",
    "caption",
    "load_config",
    "plan",
    "read_output",
    "read_output_hf",
    "run",
]
