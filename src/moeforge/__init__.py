"""moeforge: a readable training framework for DeepSeek-V3-class mixture-of-experts models."""

__version__ = "0.1.0"
