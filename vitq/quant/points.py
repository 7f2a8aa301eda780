"""The 14 quantization points of a ViT block, in one table: config section, kind, the tensor each sees in the block
and its channel axis, and the activation that feeds each weight's matmul. Config, model, cost and reports read it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["POINT_TABLE", "Point"]


@dataclass(frozen=True)
class Point:
    name: str
    section: str  # the seed config's section: layers | attn_layer | residual_layer
    kind: str  # weight | activation
    where: str  # the tensor this point quantizes
    axis: int  # channel axis of that tensor (channel_wise ranges)
    ndim: int  # its rank
    input: str | None = None  # weights: the activation point that quantizes the matmul's other operand


POINT_TABLE: tuple[Point, ...] = (
    Point("attn_qkv", "layers", "weight", "attn.qkv weight (out, in)", 0, 2, "norm1"),
    Point("attn_proj", "layers", "weight", "attn.proj weight", 0, 2, "sv_attn"),
    Point("mlp_fc1", "layers", "weight", "mlp.fc1 weight", 0, 2, "norm2"),
    Point("mlp_fc2", "layers", "weight", "mlp.fc2 weight", 0, 2, "mlp_act"),
    Point("norm1", "layers", "activation", "norm1 output (B, N, C): the qkv input", 2, 3),
    Point("norm2", "layers", "activation", "norm2 output: the fc1 input", 2, 3),
    Point("attn_qkv_output", "attn_layer", "activation", "qkv output: q, k and v", 2, 3),
    Point("kv_act", "attn_layer", "activation", "attention scores q·kᵀ (B, H, N, N), the softmax input", 1, 4),
    Point("sv_attn", "attn_layer", "activation", "attention output (softmax · v): the proj input", 2, 3),
    Point("mlp_act", "attn_layer", "activation", "GELU output: the fc2 input", 2, 3),
    Point("mlp_act2", "attn_layer", "activation", "fc2 output", 2, 3),
    Point("intSoft", "attn_layer", "activation", "softmax output (B, H, N, N)", 1, 4),
    Point("residual1", "residual_layer", "activation", "x + attention branch: the norm2 input", 2, 3),
    Point("residual2", "residual_layer", "activation", "x + MLP branch: the block output", 2, 3),
)
