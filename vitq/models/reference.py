"""The digits reference's architecture: a small timm ``VisionTransformer`` and the recipe that keys its cache.

vitq trains it on scikit-learn's digits (``vitq.reference``); this module knows no data set."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from timm.models.vision_transformer import VisionTransformer

__all__ = ["INPUT_MEAN", "INPUT_STD", "REFERENCES", "ReferenceSpec", "build_reference"]

INPUT_MEAN, INPUT_STD = 0.5, 0.5  # the normalization the reference declares: that of vitq.data's digits (tested)


@dataclass(frozen=True)
class ReferenceSpec:
    """Architecture and training recipe of the reference ViT (its hash keys the cache)."""

    img_size: int = 8
    patch_size: int = 2
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    epochs: int = 100
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_epochs: int = 5
    label_smoothing: float = 0.1
    seed: int = 0
    data_seed: int = 0
    n_train: int = 1400

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


REFERENCES: dict[str, ReferenceSpec] = {
    "digits_reference": ReferenceSpec(),
    # The per-block benchmark: 8 blocks on digits upsampled to 32×32 (patch 8: 17 tokens), trained on 600 images
    # (~50 s on 2 cores), so 1,197 held-out images remain for standard errors (docs/search.md).
    "digits_deep": ReferenceSpec(img_size=32, patch_size=8, depth=8, n_train=600),
}


def build_reference(spec: ReferenceSpec = ReferenceSpec()) -> VisionTransformer:
    """The untrained architecture (``fused_attn`` off: faster at these shapes on CPU)."""
    model = VisionTransformer(img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans,
                              num_classes=spec.num_classes, embed_dim=spec.embed_dim, depth=spec.depth,
                              num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio, drop_path_rate=spec.drop_path)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    model.pretrained_cfg = {"input_size": (spec.in_chans, spec.img_size, spec.img_size), "mean": (INPUT_MEAN,),
                            "std": (INPUT_STD,), "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                            "num_classes": spec.num_classes}
    return model
