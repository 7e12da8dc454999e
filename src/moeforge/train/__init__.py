"""Training: the trainer loop, schedules, routing-bias balancing, metrics and checkpoints."""

from .trainer import Trainer, TrainResult, evaluate

__all__ = ["Trainer", "TrainResult", "evaluate"]
