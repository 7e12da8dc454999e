"""The DeepSeek-V3 model (single device)."""

from .transformer import Block, Transformer, build_model, count_parameters, init_weights, initial_values

__all__ = ["Block", "Transformer", "build_model", "count_parameters", "init_weights", "initial_values"]
