"""Quantization core (pure torch): config, observers, quantizers and quantized modules."""
