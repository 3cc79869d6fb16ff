"""mamba-deploy: run, export, quantize and verify Mamba / Mamba2 language models."""

from .checkpoint import load_model, save_checkpoint
from .config import MambaConfig
from .errors import MambaDeployError
from .model import MambaLM, ModelOutput
from .state import State

__version__ = "0.1.0"
__all__ = ["load_model", "save_checkpoint", "MambaConfig", "MambaLM", "ModelOutput", "State",
           "MambaDeployError", "__version__"]
