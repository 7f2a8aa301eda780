"""``QuantTimmVitBlock``: a timm ViT ``Block`` with the 14 quantization points of the seed config."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, RmsNorm, SwiGLU
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from vitq.quant.chunks import chunked
from vitq.quant.config import (
    ACTIVATION_POINTS,
    POINTS,
    WEIGHT_POINTS,
    ConfigError,
    LayerQuantConfig,
    QuantConfig,
    load_config_from_yaml,
)
from vitq.quant.modules import (
    STATS_MAX_ELEMENTS,
    QAct,
    QIntSoftmax,
    QLinear,
    QPoint,
    QWeight,
    calibration_of,
    int_layernorm,
    profile_rows,
)
from vitq.quant.points import POINT_TABLE

__all__ = ["QuantTimmVitBlock", "as_layer_config", "block_linears"]

QuantConfigLike = str | Path | LayerQuantConfig | QuantConfig
RMS_NORMS = (RmsNorm, nn.RMSNorm)  # normalized by the integer LayerNorm without centering (FQ-ViT's, for RMSNorm)
ATTN_CHUNK_BYTES = 1 << 21  # attention maps made per chunk of images without gradients (fits L2/L3 cache)

_GEOMETRY: dict[str, tuple[int, int]] = {p.name: (p.axis, p.ndim) for p in POINT_TABLE}  # (channel axis, ndim)
MLPS = (Mlp, GluMlp, SwiGLU)  # the timm MLPs a block may have: plain, or gated (fc1 packed, or fc1_g and fc1_x)


def block_linears(block: nn.Module) -> dict[str, tuple[nn.Linear, ...]]:
    """The Linears behind each weight point of a timm ``Block`` (a SwiGLU's ``mlp_fc1`` is ``fc1_g`` and ``fc1_x``).

    TypeError naming what differs when the block is not one vitq quantizes: a timm ``Block`` (or subclass with its
    forward) whose ``attn`` is a plain timm ``Attention`` and whose ``mlp`` is a timm Mlp, GluMlp or SwiGLU.
    """
    kind = type(block).__name__
    if not isinstance(block, Block) or type(block).forward is not Block.forward:
        raise TypeError(f"{kind} is not a timm Block (pre-norm attention + MLP): vitq quantizes timm Blocks only")
    attn, mlp = block.attn, block.mlp
    plain = isinstance(attn, Attention) and type(attn).forward is Attention.forward
    if not plain or getattr(attn, "gate", None) is not None:
        raise TypeError(f"{kind}.attn is {type(attn).__name__}{' with a gate' if plain else ''}: "
                        f"vitq quantizes a plain timm Attention")
    known = next((c for c in MLPS if isinstance(mlp, c) and type(mlp).forward is c.forward), None)
    if known is None or getattr(mlp, "chunk_dim", -1) != -1:
        raise TypeError(f"{kind}.mlp is {type(mlp).__name__}{' (use_conv)' if known else ''}: "
                        f"vitq quantizes timm's {', '.join(c.__name__ for c in MLPS)} on Linear layers")
    fc1 = (mlp.fc1_g, mlp.fc1_x) if isinstance(mlp, SwiGLU) else (mlp.fc1,)
    lins = {"attn_qkv": (attn.qkv,), "attn_proj": (attn.proj,), "mlp_fc1": fc1, "mlp_fc2": (mlp.fc2,)}
    for key, parts in lins.items():
        for lin in parts:
            if type(lin) is not nn.Linear:
                raise TypeError(f"{kind}: {key} is {type(lin).__name__}, not a torch Linear")
    return lins


def as_layer_config(quant_config: QuantConfigLike) -> LayerQuantConfig:
    """Accept the seed's three forms: a YAML path, a ``LayerQuantConfig`` or one ``QuantConfig`` for all."""
    if isinstance(quant_config, LayerQuantConfig):
        return quant_config
    if isinstance(quant_config, QuantConfig):
        return LayerQuantConfig.uniform(quant_config)
    if isinstance(quant_config, str | Path):
        return load_config_from_yaml(quant_config)
    raise ConfigError("quant_config", f"expected a YAML path, LayerQuantConfig or QuantConfig, "
                                      f"got {type(quant_config).__name__}")


class QuantTimmVitBlock(nn.Module):
    """Fake-quantized timm ``Block``; with every point disabled it computes exactly the FP block."""

    def __init__(self, block: nn.Module, quant_config: QuantConfigLike, enable_profiling: bool = False,
                 block_index: int | None = None, max_sample_elements: int | None = STATS_MAX_ELEMENTS) -> None:
        super().__init__()
        lins = block_linears(block)
        self.block = block
        self.block_index = block_index
        self.layer_config = as_layer_config(quant_config)
        cfgs = self.layer_config.resolved(block_index)
        self.quantizers = nn.ModuleDict({
            k: QWeight(k, cfgs[k], *_GEOMETRY[k], block_index=block_index, profiling=enable_profiling)
            if k in WEIGHT_POINTS else
            QAct(k, cfgs[k], *_GEOMETRY[k], block_index=block_index, profiling=enable_profiling,
                 max_sample_elements=max_sample_elements)
            for k in POINTS})
        q = self.quantizers
        fresh_norm = {k: not isinstance(getattr(block, k), nn.Identity) for k in ("norm1", "norm2")}
        for k in ACTIVATION_POINTS:  # each activation point sees a fresh intermediate: quantize it in place
            q[k].inplace = fresh_norm.get(k, True)
        self.qkv = QLinear(lins["attn_qkv"], q["attn_qkv"])
        self.proj = QLinear(lins["attn_proj"], q["attn_proj"])
        self.fc1 = QLinear(lins["mlp_fc1"], q["mlp_fc1"])
        self.fc2 = QLinear(lins["mlp_fc2"], q["mlp_fc2"])
        self.softmax = QIntSoftmax(q["intSoft"])
        self.train(block.training)  # a new Module starts in training mode; the wrapper takes the block's

    # ------------------------------------------------------------------ lifecycle
    def points(self) -> list[QPoint]:
        return list(self.quantizers.values())

    def linears(self) -> list[QLinear]:
        return [self.qkv, self.proj, self.fc1, self.fc2]

    @contextmanager
    def calibration(self) -> Iterator[None]:
        """Observers watch FP values inside; on exit ranges are frozen and fake quantization is on."""
        yield from calibration_of(self.points(), self.linears())

    def set_config(self, quant_config: QuantConfigLike) -> None:
        """Switch to another config; ranges come from the kept calibration statistics."""
        self.layer_config = as_layer_config(quant_config)
        for k, cfg in self.layer_config.resolved(self.block_index).items():
            self.quantizers[k].set_config(cfg)
        for lin in self.linears():
            lin.refresh()

    def set_profiling(self, on: bool) -> None:
        for p in self.points():
            p.profiling = on

    def profile(self) -> pd.DataFrame:
        """One row per quantization point: observed range, scale, zero point, MSE and SQNR (dB)."""
        return pd.DataFrame(profile_rows(self.points()))

    # ------------------------------------------------------------------ forward
    def _attention(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        a: Attention = self.block.attn
        q_ = self.quantizers
        B, N, _ = x.shape
        qkv = q_["attn_qkv_output"](self.qkv(x))
        qkv = qkv.reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = a.q_norm(q), a.k_norm(k)
        if a.fused_attn and not (q_["kv_act"].active or q_["intSoft"].active):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=a.attn_drop.p if a.training else 0.0)  # as timm
        else:
            x = self._attention_maps(q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(B, N, a.attn_dim)
        x = q_["sv_attn"](a.norm(x))
        return a.proj_drop(self.proj(x))

    def _attention_maps(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """Attention with materialized maps (``kv_act``/``intSoft`` see them).

        On a CPU, without gradients, after calibration and without masks, the maps are made a few images at a time
        (``ATTN_CHUNK_BYTES``): every pass over them then runs in cache, and no large buffer is allocated.
        """
        q_ = self.quantizers
        B, H, N, _ = q.shape
        step = max(1, ATTN_CHUNK_BYTES // (H * N * k.shape[-2] * q.element_size()))
        if (step >= B or not chunked(q.device) or attn_mask is not None or is_causal
                or torch.is_grad_enabled()
                or "calib" in (q_["kv_act"].state, q_["intSoft"].state)):
            return self._attend(q, k, v, attn_mask, is_causal)
        out = q.new_empty(B, H, N, v.shape[-1])
        for i in range(0, B, step):
            self._attend(q[i:i + step], k[i:i + step], v[i:i + step], None, False, out=out[i:i + step])
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                out: Tensor | None = None) -> Tensor:
        """Scores → ``kv_act`` → softmax → ``intSoft`` → times ``v`` (written into ``out`` when given)."""
        a: Attention = self.block.attn
        attn = (q * a.scale) @ k.transpose(-2, -1)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
        attn = self.softmax(attn, self.quantizers["kv_act"])  # quantized at kv_act, softmax, intSoft
        return torch.matmul(a.attn_drop(attn), v, out=out)

    def _mlp(self, x: Tensor) -> Tensor:
        m: Mlp | GluMlp | SwiGLU = self.block.mlp
        q_ = self.quantizers
        h = self.fc1(x)
        if isinstance(m, SwiGLU):  # fc1 = [fc1_g, fc1_x]
            gate, h = h.split(m.fc1_g.out_features, dim=-1)
            h = m.act(gate) * h
        elif isinstance(m, GluMlp):
            x1, x2 = h.chunk(2, dim=-1)
            h = x1 * m.act(x2) if m.gate_last else m.act(x1) * x2
        else:
            h = m.act(h)
        x = self.fc2(q_["mlp_act"](m.norm(m.drop1(h))))
        return m.drop2(q_["mlp_act2"](x))

    def set_input_point(self, point: QAct | None) -> None:
        """The point that quantizes this block's input (the previous block's ``residual2``), if any."""
        self._input_point = (point,)  # a tuple: not registered as a submodule

    def _norm(self, key: str, x: Tensor, in_point: QAct | None) -> Tensor:
        """``normX`` and its output point; FQ-ViT's integer LayerNorm when the input lies on a PTF grid."""
        norm, out_q = getattr(self.block, key), self.quantizers[key]
        ptf = (in_point is not None and in_point.state == "quant" and in_point.cfg.enabled
               and in_point.cfg.calibration_mode == "ptf" and out_q.state == "quant" and out_q.cfg.enabled)
        if not ptf or (torch.is_grad_enabled() and x.requires_grad):
            return out_q(norm(x))
        center = isinstance(norm, nn.LayerNorm)
        known = center or isinstance(norm, RMS_NORMS)
        if not known or norm.weight is None:
            raise ConfigError(f"residual_layer.{in_point.key}.calibration_mode",
                              f"ptf feeds an integer LayerNorm, but {key} is {type(norm).__name__}"
                              f"{' without a weight' if known else ''}")
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps  # (torch's RMSNorm: None = that)
        y = int_layernorm(x, in_point.fq.scale, norm.weight, getattr(norm, "bias", None), out_q.fq.scale, eps, center)
        if not out_q.profiling:
            return out_q(y)
        out_q.profiling = False  # profile against the float LayerNorm, not the integer one (already on the grid)
        try:
            q = out_q(y)
        finally:
            out_q.profiling = True
        out_q.prof.add(norm(x), q)
        return q

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        b, q_ = self.block, self.quantizers
        h = self._attention(self._norm("norm1", x, getattr(self, "_input_point", (None,))[0]), attn_mask, is_causal)
        x = q_["residual1"](x + b.drop_path1(b.ls1(h)))
        h = self._mlp(self._norm("norm2", x, q_["residual1"]))
        return q_["residual2"](x + b.drop_path2(b.ls2(h)))
