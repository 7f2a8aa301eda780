"""A bring-your-own case unlike vitq's defaults: a timm ViT with non-default kwargs, briefly trained, saved by timm's
train-script ``CheckpointSaver`` (EMA weights, optimizer state, ``args``), and grayscale PNG class folders
``calib/`` and ``eval/`` written by the test. Nothing here imports vitq.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

MODEL_NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2, "num_classes": 10,
          "init_values": 1e-5, "global_pool": "avg", "class_token": False}
KWARGS_CLI = "model.kwargs={img_size:16,patch_size:4,embed_dim:48,depth:2,num_heads:2,num_classes:10," \
             "init_values:1e-5,global_pool:avg,class_token:false}"


@dataclass
class Case:
    root: Path
    calib: Path
    eval: Path
    checkpoint: Path
    other_checkpoint: Path  # same architecture, other weights

    def cli(self) -> list[str]:
        return ["model=timm", f"model.name={MODEL_NAME}", KWARGS_CLI, f"model.checkpoint={self.checkpoint}",
                "data=folder", f"data.calib_root={self.calib}", f"data.eval_root={self.eval}", "device=cpu"]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = (d.images * 15).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(x).resize((16, 16), Image.BILINEAR)) for x in img])
    return big, d.target.astype(np.int64)


def write_folders(root: Path, n_calib: int = 1000) -> tuple[Path, Path]:
    """Grayscale 16×16 PNGs in calib/<class>/ and eval/<class>/ (class-sorted names, as a user's folder is)."""
    pixels, labels = _digits()
    order = np.random.default_rng(0).permutation(len(labels))
    for split, idx in (("calib", order[:n_calib]), ("eval", order[n_calib:])):
        for i in idx:
            d = root / split / f"digit_{labels[i]}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(d / f"{i:04d}.png")
    return root / "calib", root / "eval"


def plain_timm_transform(model: torch.nn.Module, size: int = 16):  # noqa: ANN201
    """timm's own eval transform for the model at its built size (ToTensor + Normalize included)."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
    return create_transform(**cfg, is_training=False)


def folder_tensors(folder: Path, transform) -> tuple[torch.Tensor, torch.Tensor, list[str]]:  # noqa: ANN001
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(folder), transform=transform, loader=lambda p: Image.open(p).convert("RGB"))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return x, torch.tensor(ds.targets), [p for p, _ in ds.samples]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 12,
          seed: int = 0) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 64):
                idx = perm[i:i + 64]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    return opt


def timm_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> Path:
    """``model_best.pth.tar`` as timm's train script writes it, by its own ``CheckpointSaver``: ``state_dict``,
    ``state_dict_ema`` (a ``ModelEmaV3``), the optimizer's state, ``args`` (an ``argparse.Namespace``), epoch and
    metric."""
    import argparse

    from timm.utils import CheckpointSaver, ModelEmaV3

    args = argparse.Namespace(model=MODEL_NAME, lr=3e-3, epochs=12, input_size=None, mean=None, std=None)
    folder.mkdir(parents=True, exist_ok=True)
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ModelEmaV3(model), checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=1)
    saver.save_checkpoint(epoch=11, metric=0.9)
    return folder / "model_best.pth.tar"


def build(root: Path) -> Case:
    calib, ev = write_folders(root)
    torch.manual_seed(0)
    model = timm.create_model(MODEL_NAME, **KWARGS)
    x, y, _ = folder_tensors(calib, plain_timm_transform(model))
    ckpt = timm_checkpoint(model, train(model, x, y), root)
    torch.manual_seed(1)
    other = timm.create_model(MODEL_NAME, **KWARGS)
    other_ckpt = root / "other.pth"
    torch.save(other.state_dict(), other_ckpt)
    return Case(root, calib, ev, ckpt, other_ckpt)


def plain_timm_predictions(case: Case) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Top-1 predictions of plain timm on every eval image, with its labels and file paths."""
    model = timm.create_model(MODEL_NAME, **KWARGS)
    timm.models.load_checkpoint(model, str(case.checkpoint))  # its EMA weights, as timm's validate.py reads them
    model.eval()
    x, y, paths = folder_tensors(case.eval, plain_timm_transform(model))
    with torch.inference_mode():
        return model(x).argmax(-1), y, paths


def jax_npz(model: torch.nn.Module, path: Path) -> None:
    """``model``'s weights in the original JAX ViT layout (``Transformer/encoderblock_i/...``, HWIO kernels, heads
    split), as Google's ``.npz`` checkpoints hold them; for a timm ViT without layer scale."""
    t = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    c, h = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0), "embedding/bias":
         t["patch_embed.proj.bias"], "Transformer/posembed_input/pos_embedding": t["pos_embed"],
         "Transformer/encoder_norm/scale": t["norm.weight"], "Transformer/encoder_norm/bias": t["norm.bias"],
         "head/kernel": t["head.weight"].T, "head/bias": t["head.bias"]}
    if "cls_token" in t:
        w["cls"] = t["cls_token"]
    for i in range(len(model.blocks)):
        b, j = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{j}{ln}/scale"], w[f"{j}{ln}/bias"] = t[f"{b}{norm}.weight"], t[f"{b}{norm}.bias"]
        qkv_w, qkv_b = t[f"{b}attn.qkv.weight"].reshape(3, c, c), t[f"{b}attn.qkv.bias"].reshape(3, c)
        for n, name in enumerate(("query", "key", "value")):
            w[f"{j}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[n].T.reshape(c, h, c // h)
            w[f"{j}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[n].reshape(h, c // h)
        w[f"{j}MultiHeadDotProductAttention_1/out/kernel"] = t[f"{b}attn.proj.weight"].reshape(c, h, c // h) \
            .transpose(1, 2, 0)
        w[f"{j}MultiHeadDotProductAttention_1/out/bias"] = t[f"{b}attn.proj.bias"]
        for r in range(2):
            w[f"{j}MlpBlock_3/Dense_{r}/kernel"] = t[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{j}MlpBlock_3/Dense_{r}/bias"] = t[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def lightning_checkpoint(state: dict[str, torch.Tensor], path: Path) -> None:
    """A PyTorch Lightning checkpoint of a lightning-hydra-template module that holds the timm model, with the
    weights ``state``, as ``self.net``, written by a real ``Trainer`` (one step at lr 0 leaves the weights as they
    are). Its ``net.`` keys sit beside the module's own, and its hyperparameters pickle the model whole and a
    ``functools.partial`` optimizer, which ``torch.load(weights_only=True)`` refuses."""
    import functools
    import logging
    import warnings

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class LitViT(pl.LightningModule):  # lightning-hydra-template's MNISTLitModule, on a timm ViT
        def __init__(self, net: torch.nn.Module, optimizer: functools.partial, compile: bool = False) -> None:
            super().__init__()
            self.save_hyperparameters(logger=False)
            self.net = net
            self.criterion = torch.nn.CrossEntropyLoss(weight=torch.ones(KWARGS["num_classes"]))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], i: int) -> torch.Tensor:
            return self.criterion(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return self.hparams.optimizer(params=self.parameters())

    net = timm.create_model(MODEL_NAME, **KWARGS)
    net.load_state_dict(state)
    images = torch.randn(4, net.patch_embed.proj.in_channels, KWARGS["img_size"], KWARGS["img_size"])
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on save_hyperparameters and its own deprecations
        lit = LitViT(net, functools.partial(torch.optim.SGD, lr=0.0))
        trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, default_root_dir=str(path.parent))
        trainer.fit(lit, DataLoader(TensorDataset(images, torch.arange(4)), batch_size=4))
    trainer.save_checkpoint(str(path))
