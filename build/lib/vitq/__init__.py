"""vitq: mixed-precision post-training quantization sweeps for timm Vision Transformers."""

from vitq.quant.config import BitTypeConfig, ConfigError, LayerQuantConfig, QuantConfig, load_config_from_yaml

__all__ = ["BitTypeConfig", "ConfigError", "LayerQuantConfig", "QuantConfig", "load_config_from_yaml"]
__version__ = "0.1.0"
