"""Quantize a whole timm ``VisionTransformer``: every ``Block`` becomes a ``QuantTimmVitBlock``.

Run ``python -m vitq.models.vit`` for a self-check: quantize a small timm ViT with each preset, calibrate, and print
the logits' SQNR and every point's against the FP model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
from torch import Tensor, nn

from vitq.models.vit_block import QuantConfigLike, QuantTimmVitBlock, as_layer_config, block_linears
from vitq.quant.config import ConfigError, LayerQuantConfig
from vitq.quant.modules import STATS_MAX_ELEMENTS, QLinear, QPoint, calibration_of, profile_rows

__all__ = ["QuantViT", "check_block_indices", "check_quantizable", "quantize_vit"]


class QuantViT(nn.Module):
    """A timm ViT whose blocks are quantized; same lifecycle as a block (calibration, set_config, profile).

    Patch embedding, cls/pos tokens and the head stay FP.
    """

    def __init__(self, model: nn.Module, quant_config: QuantConfigLike, enable_profiling: bool = False,
                 max_sample_elements: int | None = STATS_MAX_ELEMENTS) -> None:
        super().__init__()
        check_quantizable(model)
        blocks = model.blocks
        cfg = as_layer_config(quant_config)
        check_block_indices(cfg, len(blocks))
        self.layer_config = cfg
        for i, blk in enumerate(blocks):
            if not isinstance(blk, QuantTimmVitBlock):
                blocks[i] = QuantTimmVitBlock(blk, cfg, enable_profiling=enable_profiling, block_index=i,
                                              max_sample_elements=max_sample_elements)
        for prev, blk in zip(blocks[:-1], blocks[1:], strict=True):  # block i's norm1 reads block i-1's residual2
            blk.set_input_point(prev.quantizers["residual2"])
        self.model = model
        self.training = model.training  # (a new Module starts in training mode; its blocks took theirs)

    @property
    def qblocks(self) -> list[QuantTimmVitBlock]:
        return list(self.model.blocks)

    @property
    def quantizers(self) -> dict[str, QPoint]:
        """Every point by dotted name, ``blocks.3.attn_qkv``."""
        return {p.label: p for b in self.qblocks for p in b.points()}

    def points(self) -> list[QPoint]:
        return [p for b in self.qblocks for p in b.points()]

    def linears(self) -> list[QLinear]:
        return [lin for b in self.qblocks for lin in b.linears()]

    @contextmanager
    def calibration(self) -> Iterator[None]:
        yield from calibration_of(self.points(), self.linears())

    def set_config(self, quant_config: QuantConfigLike) -> None:
        cfg = as_layer_config(quant_config)
        check_block_indices(cfg, len(self.qblocks))
        self.layer_config = cfg
        for b in self.qblocks:
            b.set_config(cfg)

    def set_profiling(self, on: bool) -> None:
        for b in self.qblocks:
            b.set_profiling(on)

    def profile(self) -> pd.DataFrame:
        """One row per quantization point of every block, in block order (one frame: built once per trial)."""
        return pd.DataFrame(profile_rows(self.points()))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def check_quantizable(model: nn.Module) -> None:
    """TypeError naming the first block (and what in it) that vitq cannot quantize; see :func:`block_linears`."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not hasattr(model, "patch_embed"):
        raise TypeError(f"{type(model).__name__} is not a timm VisionTransformer (patch_embed + blocks): "
                        f"vitq quantizes timm VisionTransformers")
    for i, blk in enumerate(blocks):
        try:
            block_linears(getattr(blk, "block", blk))  # (a QuantTimmVitBlock wraps its timm Block)
        except TypeError as e:
            raise TypeError(f"blocks.{i}: {e}") from None


def check_block_indices(cfg: LayerQuantConfig, depth: int) -> None:
    """ConfigError for a ``blocks.N`` entry past the model's depth."""
    for b in cfg.blocks:
        if b >= depth:
            raise ConfigError(f"blocks.{b}", f"the model has {depth} blocks (0..{depth - 1})")


def quantize_vit(model: nn.Module, quant_config: QuantConfigLike, enable_profiling: bool = False,
                 inplace: bool = False, max_sample_elements: int | None = STATS_MAX_ELEMENTS) -> QuantViT:
    """Wrap every block of a timm ``VisionTransformer`` (a deep copy unless ``inplace``).

    ``max_sample_elements``: calibration values kept per point and batch (None: every value)."""
    return QuantViT(model if inplace else copy.deepcopy(model), quant_config, enable_profiling, max_sample_elements)


def _self_check() -> None:
    import torch
    from timm.models.vision_transformer import VisionTransformer

    from vitq.paths import PRESETS_DIR as conf
    from vitq.quant.config import load_config_from_yaml

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=96, depth=2, num_heads=4).eval()
    x = torch.randn(64, 3, 32, 32)
    for name in ("int8", "w4a8", "fqvit"):
        path = conf / f"{name}.yaml"
        cfg = load_config_from_yaml(path) if path.is_file() else LayerQuantConfig()
        qmodel = quantize_vit(model, cfg, enable_profiling=True)
        with torch.inference_mode():
            with qmodel.calibration():
                qmodel(x[:32])
            ref = model(x[32:])
            out = qmodel(x[32:])
        err = (out - ref).pow(2).sum() / ref.pow(2).sum()
        df = qmodel.profile()
        print(f"\n== {name}: logits SQNR {-10 * torch.log10(err).item():.1f} dB")
        print(df.groupby("point", sort=False)["sqnr_db"].mean().round(1).to_string())


if __name__ == "__main__":
    _self_check()
