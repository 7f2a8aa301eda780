"""Quantize a whole timm ``VisionTransformer``: every ``Block`` becomes a ``QuantTimmVitBlock``."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
from torch import Tensor, nn

from vitq.models.vit_block import QuantConfigLike, QuantTimmVitBlock, as_layer_config
from vitq.quant.config import ConfigError, LayerQuantConfig
from vitq.quant.modules import STATS_MAX_ELEMENTS, QAct, QLinear, calibration_of

__all__ = ["QuantViT", "check_block_indices", "quantize_vit"]


class QuantViT(nn.Module):
    """A timm ViT whose blocks are quantized; same lifecycle as a block (calibration, set_config, profile).

    Patch embedding, cls/pos tokens and the head stay FP.
    """

    def __init__(self, model: nn.Module, quant_config: QuantConfigLike, enable_profiling: bool = False,
                 max_sample_elements: int | None = STATS_MAX_ELEMENTS) -> None:
        super().__init__()
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise TypeError(f"quantize_vit needs a timm VisionTransformer (with .blocks), got {type(model).__name__}")
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

    @property
    def qblocks(self) -> list[QuantTimmVitBlock]:
        return list(self.model.blocks)

    @property
    def quantizers(self) -> dict[str, QAct]:
        """Every point by dotted name, ``blocks.3.attn_qkv``."""
        return {p.label: p for b in self.qblocks for p in b.points()}

    def points(self) -> list[QAct]:
        return [p for b in self.qblocks for p in b.points()]

    def linears(self) -> list[QLinear]:
        return [lin for b in self.qblocks for lin in b.linears()]

    @contextmanager
    def calibration(self) -> Iterator[None]:
        yield from calibration_of(self.points(), self.linears())

    @property
    def calibrated(self) -> bool:
        return all(p.state == "quant" for p in self.points())

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
        return pd.concat([b.profile() for b in self.qblocks], ignore_index=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


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
