"""timm ViT models: quantized blocks, whole-model wrapping, the digits reference and a factory."""
