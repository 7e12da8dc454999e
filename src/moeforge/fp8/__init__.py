"""FP8 training with DeepSeek-V3's fine-grained recipe: 1x128 activation tiles, 128x128 weight blocks.

`quantize(x, block)` / `dequantize(q, scales, block)` are the reference quantisation; `convert_to_fp8`
switches a model's Linears and routed experts to FP8 GEMMs (emulated exactly on any device);
`weight_cache()` reuses quantised weights across the micro-batches of one optimizer step.
"""

from .cache import weight_cache
from .linear import FP8Experts, FP8FeedForward, FP8Linear, FP8Recipe, convert_to_fp8
from .quant import FP8_MAX, dequantize, fake_quantize, quantize

__all__ = ["FP8_MAX", "FP8Experts", "FP8FeedForward", "FP8Linear", "FP8Recipe", "convert_to_fp8", "dequantize", "fake_quantize", "quantize", "weight_cache"]
