"""o2f: One-to-Few label assignment for end-to-end dense detection, in plain PyTorch."""

from o2f import assign, deploy, evaluation, losses
from o2f.config import Config, load_config
from o2f.model.detector import O2F, build_model
from o2f.tiling import predict_tiled

__version__ = "0.1.0"
__all__ = ["O2F", "Config", "assign", "build_model", "deploy", "evaluation", "load_config",
           "losses", "predict_tiled", "__version__"]
