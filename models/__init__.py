"""Neural networks and the torch training loops shared by clients and the server.

This floor imports torch and numpy only (no Flower), so both `client/` and `server/` can use it.
"""

from models.nets import MODEL_NAMES, build_model
from models.training import TrainConfig, evaluate, predict_proba, set_torch_threads, train

__all__ = ["MODEL_NAMES", "TrainConfig", "build_model", "evaluate", "predict_proba", "set_torch_threads", "train"]
