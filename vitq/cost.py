"""Cost model of a quantized ViT: weight storage, compression, mean bits and BOPs (Σ MACs × w bits × a bits).

Storage: a quantized weight costs ``bits`` per element plus a 32-bit scale per channel (or tensor) and,
for unsigned (affine) grids, a 32-bit zero point each; every other parameter stays FP32. Disabled
points count 32 bits. BOPs follow AIMET: per image, each matmul's MACs times its two operands' bits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vitq.models.vit_block import block_linears
from vitq.quant.config import ACTIVATION_POINTS, WEIGHT_POINTS, LayerQuantConfig, QuantConfig
from vitq.quant.points import POINT_TABLE

__all__ = ["BOP_PAIRS", "CostReport", "model_cost", "resolved_cost", "token_count"]

FP_BITS = 32
# linear weight point -> activation point that quantizes its input
_INPUT_OF = {p.name: p.input for p in POINT_TABLE if p.kind == "weight"}
# pairs of points whose widths multiply in BOPs (besides attn_qkv_output with itself, in q·kᵀ)
BOP_PAIRS: tuple[tuple[str, str], ...] = (*_INPUT_OF.items(), ("intSoft", "attn_qkv_output"))


@dataclass
class CostReport:
    fp32_bytes: float
    weight_bytes: float
    compression: float
    mean_weight_bits: float
    mean_act_bits: float
    bops: float
    macs: float


def _bits(cfg: QuantConfig) -> int:
    return cfg.bit_type.bits if cfg.enabled else FP_BITS


def _fp_model(model: nn.Module) -> nn.Module:
    return getattr(model, "model", model)


def token_count(model: nn.Module, input_size: tuple[int, int] | None = None) -> int:
    """Tokens per image: the patches of an ``input_size`` (H, W) image (None: the size the model was built for; a
    model of any size, ``dynamic_img_size``, may see others) plus the prefix tokens (class, registers)."""
    vit = _fp_model(model)
    pe = vit.patch_embed
    built = getattr(pe, "img_size", None)
    if input_size is None or (built is not None and tuple(input_size) == tuple(built)):
        patches = pe.num_patches
    else:
        gh, gw = pe.dynamic_feat_size(tuple(input_size))
        patches = gh * gw
    return int(patches) + getattr(vit, "num_prefix_tokens", 1)


def model_cost(model: nn.Module, cfg: LayerQuantConfig, input_size: tuple[int, int] | None = None) -> CostReport:
    """Cost of ``model`` (a timm ViT or a QuantViT) under ``cfg`` on ``input_size`` images (see
    :func:`token_count`); needs no calibration."""
    return resolved_cost(model, [cfg.resolved(b) for b in range(len(_fp_model(model).blocks))], input_size)


def resolved_cost(model: nn.Module, per_block: list[dict[str, QuantConfig]],
                  input_size: tuple[int, int] | None = None) -> CostReport:
    """Cost of ``model`` with block ``b``'s points configured by ``per_block[b]`` (what ``cfg.resolved(b)`` gives);
    the budget solver's cost table calls it for thousands of configs without building a LayerQuantConfig each."""
    vit = _fp_model(model)
    params = dict(vit.named_parameters())
    fp32_bytes = sum(p.numel() for p in params.values()) * FP_BITS / 8
    n_tokens = token_count(vit, input_size)
    quantized: set[int] = set()
    weight_bits = 0.0
    w_elems = w_bits_sum = 0.0
    act_bits: list[int] = []
    macs = bops = 0.0
    for block, res in zip(vit.blocks, per_block, strict=True):
        lins = block_linears(getattr(block, "block", block))
        for key in WEIGHT_POINTS:
            c = res[key]
            n = sum(lin.weight.numel() for lin in lins[key])
            w_elems += n
            w_bits_sum += n * _bits(c)
            if c.enabled:
                quantized.update(id(lin.weight) for lin in lins[key])
                n_scales = sum(lin.out_features for lin in lins[key]) if c.calibration_mode == "channel_wise" else 1
                weight_bits += n * c.bit_type.bits + n_scales * FP_BITS * (1 if c.bit_type.signed else 2)
            m = n_tokens * n
            macs += m
            bops += m * _bits(c) * _bits(res[_INPUT_OF[key]])
        act_bits += [_bits(res[k]) for k in ACTIVATION_POINTS]
        attn = getattr(block, "block", block).attn
        m = attn.num_heads * n_tokens * n_tokens * attn.head_dim  # q·kᵀ and attn·v each
        a_qkv = _bits(res["attn_qkv_output"])
        macs += 2 * m
        bops += m * a_qkv * a_qkv + m * _bits(res["intSoft"]) * a_qkv
    for p in params.values():
        if id(p) not in quantized:
            weight_bits += p.numel() * FP_BITS
    weight_bytes = weight_bits / 8
    return CostReport(fp32_bytes=fp32_bytes, weight_bytes=weight_bytes, compression=fp32_bytes / weight_bytes,
                      mean_weight_bits=w_bits_sum / w_elems, mean_act_bits=sum(act_bits) / len(act_bits),
                      bops=bops, macs=macs)
