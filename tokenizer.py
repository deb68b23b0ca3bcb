"""Hierarchical (pyramid) autoencoder: paper §3.1, Fig. 1, Fig. 5, App. A.2.

Every frame is encoded on its own into L levels of latent tokens. Level l holds (H/p/2^l)·(W/p/2^l) tokens of
C channels (paper: 256/64/16/4 tokens of 32 channels for a 256² frame), and each level can be decoded alone into
a whole frame: coarse levels keep layout and semantics, fine levels add texture.

  encoder: box-filter image pyramid → one shared patch embedding for every level → 2D sin/cos position in the
           token's own level grid + learned level embedding → one ViT over all levels' tokens at once (coarse
           tokens can read the full-resolution image) → tanh(Linear(width → C)) bottleneck.
  decoder: keep one level (the others are zeroed but stay in the sequence) → Linear(C → width) + the same
           embeddings → DiT blocks with adaLN-Zero on the kept level → a Linear head: a p×p RGB patch per token.
  loss:    equal-weight MSE over the output pyramid + lpips_weight · LPIPS(VGG) on level 0.
The cascaded ablation (§5 Q1/Q2, Fig. 5 bottom, Fig. 6, `variant="cascaded"`) replaces the learned coarse levels
by 2×2 mean pools of the level-0 latents. diffusion.py shares the transformer pieces and the checkpoint readers.

    python tokenizer.py levels runs/toy/ae --data runs/toy/data/test --image levels.png    # Fig. 5
"""
import argparse
import glob
import hashlib
import math
import os
import pickle
import subprocess
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import data


@dataclass
class AEConfig:
    # model (App. A.2): 256² frames, 16² patches, L = 4 levels, 32 channels, ViT-B encoder and decoder
    image_size: int = 256         # frame side in pixels
    patch_size: int = 16          # p, pixels per token side at level 0
    levels: int = 4               # L, hierarchy levels (each halves the token grid)
    channels: int = 32            # C, latent channels per token
    width: int = 768              # encoder and decoder are the same size (ViT-B / DiT-B)
    depth: int = 12               # transformer blocks of the encoder and of the decoder
    heads: int = 12               # attention heads
    mlp_ratio: float = 4.0        # MLP hidden width / width
    lpips_weight: float = 0.05    # LPIPS(VGG) on the level-0 output (§3.1)
    variant: str = "hierarchical"  # "hierarchical" (learned levels) | "cascaded" (mean-pooled ablation, §5)
    # training (App. A.2): 224 per GPU × 8 GPUs, 128k steps, lr 1e-3, wd 0.01, 2k-step linear warmup
    batch_size: int = 224         # frames per device and step
    steps: int = 128_000          # optimizer steps
    lr: float = 1e-3              # learning rate (Muon and AdamW)
    weight_decay: float = 0.01    # decoupled weight decay
    warmup: int = 2000            # steps of linear warmup

    def __post_init__(self):
        coarsest = self.patch_size * 2 ** (self.levels - 1)
        checks = [(self.levels >= 1, "levels", "at least 1"),
                  (self.image_size % coarsest == 0, "image_size",
                   f"a multiple of patch_size·2^(levels-1) = {coarsest}, so every level has whole patches"),
                  (self.width % self.heads == 0, "width", f"a multiple of heads = {self.heads}"),
                  (self.width % 4 == 0, "width", "a multiple of 4 (2D sin/cos positions)"),
                  (self.variant in ("hierarchical", "cascaded"), "variant", "'hierarchical' or 'cascaded'"),
                  (self.lpips_weight >= 0, "lpips_weight", ">= 0"),
                  (self.steps >= 1 and self.batch_size >= 1 and self.warmup >= 0, "steps", ">= 1, batch_size >= 1"),
                  (math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"AEConfig.{name} = {getattr(self, name)!r}: expected {expected}")


PRESETS = {
    "paper": {},
    # toy: 64² maze frames, patch 8 → 64+16+4+1 tokens, ~8 M parameters, minutes on one GPU. lpips_weight 0 (ours):
    # the toy runs offline anywhere, and LPIPS(VGG) needs 528 MB of ImageNet weights (--lpips_weight=0.05 once there)
    "toy": dict(image_size=data.PRESETS["toy"]["size"], patch_size=8, levels=4, channels=16, width=256, depth=4,
                heads=4, lpips_weight=0.0, batch_size=128, steps=10_000, warmup=500),
    # tiny: 32² frames, patch 8 → 16+4+1 tokens, for CPU tests; no LPIPS (no VGG weights needed).
    "tiny": dict(image_size=data.PRESETS["tiny"]["size"], patch_size=8, levels=3, channels=8, width=64, depth=2,
                 heads=2, lpips_weight=0.0, batch_size=16, steps=800, warmup=50),
}
PRESETS["spin"] = PRESETS["tiny"] | dict(steps=2000)  # the memory probe on a CPU: tiny's, trained longer


def ae_config(preset="paper", **overrides):
    return data.make_config(AEConfig, PRESETS, preset, overrides)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- pyramid, patches, positions, blocks
def box_pyramid(x, levels):
    """Image pyramid (§3.1): level 0 is the frame, level l+1 the 2×2 average pool of level l."""
    pyramid = [x]                                            # (B, 3, H, W)
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], 2))         # (B, 3, H/2^l, W/2^l)
    return pyramid


def patchify(img, p):
    """(B, c, H, W) → (B, H/p·W/p, c·p·p): p×p patches row-major, each flattened as (channel, row, col)."""
    B, c, H, W = img.shape
    x = img.reshape(B, c, H // p, p, W // p, p)              # (B, c, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                          # (B, h, w, c, p, p)
    return x.reshape(B, (H // p) * (W // p), c * p * p)      # (B, h·w, c·p·p)


def unpatchify(tokens, p, h, w):
    """Inverse of patchify for RGB: (B, h·w, 3·p·p) → (B, 3, h·p, w·p)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, 3, p, p)                     # (B, h, w, 3, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)                          # (B, 3, h, p, w, p)
    return x.reshape(B, 3, h * p, w * p)                     # (B, 3, H, W)


def mean_pool_tokens(z, h, w):
    """2×2 mean pool of a row-major token grid: (B, h·w, C) → (B, h/2·w/2, C) (cascaded ablation)."""
    B, _, C = z.shape
    grid = z.transpose(1, 2).reshape(B, C, h, w)             # (B, C, h, w)
    return F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # (B, h/2·w/2, C)


def sincos_embed(pos, dim):
    """1D sin/cos embedding pos (...) → (..., dim): [sin(pos·ω_i), cos(pos·ω_i)], ω_i = 10000^(-i/(dim/2-1)).
    The -1 (frequencies from 1 down to exactly 1/10000) is the authors' table: their released weights need it."""
    n = dim // 2
    omega = 10000.0 ** -(torch.arange(n, dtype=torch.float32, device=pos.device) / max(n - 1, 1))
    angle = pos.float()[..., None] * omega                   # (..., dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)     # (..., dim)


def pyramid_layout(grids, width):
    """Per-token 2D sin/cos position (T, width) and level index (T,), level-major then row-major. Columns fill the
    first half of the channels, rows the second (the authors' order). (row, col) count in the token's own level grid,
    not rescaled to level 0 (§3.1); the level embedding tells the levels apart."""
    pos, level = [], []
    for l, (h, w) in enumerate(grids):
        row, col = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
        pos.append(torch.cat([sincos_embed(col.flatten(), width // 2),
                              sincos_embed(row.flatten(), width // 2)], dim=-1))   # (h·w, width)
        level.append(torch.full((h * w,), l))
    return torch.cat(pos), torch.cat(level)                  # (T, width), (T,)


class PatchEmbed(nn.Module):
    """One Linear over flattened p×p RGB patches, shared by every pyramid level (§3.1)."""
    def __init__(self, patch_size, width):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(3 * patch_size ** 2, width)

    def forward(self, img):                                  # (B, 3, H, W) → (B, H/p·W/p, width)
        return self.proj(patchify(img, self.patch_size))


class Attention(nn.Module):
    """Multi-head self-attention, q and k RMS-normalised per head (keeps the logits bounded in bf16)."""
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = nn.RMSNorm(width // heads), nn.RMSNorm(width // heads)
        self.proj = nn.Linear(width, width)

    def forward(self, x):                                    # (B, T, D) → (B, T, D)
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, heads, D/heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                 # 3 × (B, heads, T, D/heads)
        # the norms run in fp32 even under bf16 autocast, then match v's dtype for the fused kernel
        q, k = self.q_norm(q.float()).to(v.dtype), self.k_norm(k.float()).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)          # (B, heads, T, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class Block(nn.Module):
    """Pre-norm ViT block (the encoder's; AdaLNBlock extends it). Like the authors', LayerNorms without gain/bias."""
    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        # feed-forward Linear → GELU(tanh) → Linear, named as timm's Mlp (fc1, fc2) like the authors' weights
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, hidden), act=nn.GELU(approximate="tanh"),
                                             fc2=nn.Linear(hidden, width)))

    def forward(self, x):                                    # (B, T, D) → (B, T, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def modulate(x, shift, scale):
    # adaLN (DiT): x·(1 + scale) + shift, so zero modulation leaves the normalised x unchanged
    return x * (1 + scale) + shift


def per_token(rows, index=None):
    """Modulation rows for (B, T, D) tokens: one per sample (B, D) → (B, 1, D), or each token's of U distinct
    rows (U, D) given index (B, T) → (B, T, D) (index_select: its backward is ~10x faster on CPU than [])."""
    return rows[:, None] if index is None else rows.index_select(0, index.flatten()).unflatten(0, index.shape)


class AdaLNBlock(Block):
    """adaLN-Zero DiT block: c per sample (B, D), or U rows (U, D) picked by index (B, T): the Linear runs U times."""
    def __init__(self, width, heads, mlp_ratio):
        super().__init__(width, heads, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, index=None):                     # x (B, T, D), c (B or U, D)
        with torch.autocast(x.device.type, enabled=False):   # fp32 rows even under bf16 autocast: a row is shared
            rows = self.adaLN_modulation(c.float()).chunk(6, dim=-1)  # by many tokens, whose gradients it sums
        shift1, scale1, gate1, shift2, scale2, gate2 = [per_token(r, index) for r in rows]  # 6 × (B, 1 or T, D)
        # x + gate · attn(adaLN(x)), then x + gate · mlp(adaLN(x)); zero gates at init: an identity block
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


# ----------------------------------------------------------------------------- the autoencoder: encoder, decoder, loss
class Encoder(nn.Module):
    """Image → all levels' latents at once (§3.1)."""
    def __init__(self, cfg, grids):
        super().__init__()
        self.levels = cfg.levels
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.level_embed = nn.Embedding(cfg.levels, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.bottleneck = nn.Linear(cfg.width, cfg.channels)
        pos, token_level = pyramid_layout(grids, cfg.width)  # fixed tables from the config: not in the state_dict
        self.register_buffer("pos", pos, persistent=False)                  # (T, D)
        self.register_buffer("token_level", token_level, persistent=False)  # (T,)

    def forward(self, x):                                    # (B, 3, H, W) → (B, T, C), T = Σ_l T_l
        tokens = torch.cat([self.patch_embed(img) for img in box_pyramid(x, self.levels)], dim=1)  # (B, T, D)
        h = tokens + self.pos + self.level_embed(self.token_level)
        for block in self.blocks:                            # joint attention over every level's tokens
            h = block(h)
        # bottleneck: deterministic, bounded latents; no KL, noise or quantisation (§3.1). Run in fp32 even under
        # bf16 autocast: bf16 would round the latents the video model learns (stored as float16, 2^-11 steps) to 2^-8
        with torch.autocast(h.device.type, enabled=False):
            return torch.tanh(self.bottleneck(h.float()))    # (B, T, C) float32


class Decoder(nn.Module):
    """Latents with one kept level → output pyramid patches (§3.1)."""
    def __init__(self, cfg, grids):
        super().__init__()
        self.in_proj = nn.Linear(cfg.channels, cfg.width)
        # one table for the per-token level embedding and the adaLN condition (as the authors do)
        self.level_embed = nn.Embedding(cfg.levels, cfg.width)
        self.blocks = nn.ModuleList(AdaLNBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        # no final norm or final adaLN before the head: the authors' layout, which gives the paper's 128.2 M
        self.head = nn.Linear(cfg.width, 3 * cfg.patch_size ** 2)
        pos, token_level = pyramid_layout(grids, cfg.width)
        self.register_buffer("pos", pos, persistent=False)                  # (T, D)
        self.register_buffer("token_level", token_level, persistent=False)  # (T,)

    def forward(self, z, level):                             # z (B, T, C), level (B,) long → (B, T, 3·p·p)
        h = self.in_proj(z) + self.pos + self.level_embed(self.token_level)  # (B, T, D)
        c = self.level_embed(level)                          # (B, D): the kept level conditions every block
        for block in self.blocks:
            h = block(h, c)
        return self.head(h)                                  # (B, T, 3·p·p), no sigmoid


def pyramid_mse(pred, target):
    """Equal-weight pyramid MSE (§3.1): each token's squared error weighted 4^l, then the mean over all T tokens;
    with T_l = T_0/4^l tokens at level l,  (1/T)·Σ_l 4^l·T_l·MSE_l = (T_0/T)·Σ_l MSE_l,
    so every level counts the same although level l has 4^-l as many pixels. Returns (loss, [MSE_l])."""
    mse = [F.mse_loss(p.float(), t.float()) for p, t in zip(pred, target)]  # per-pixel MSE per level
    pixels = [t.shape[-2] * t.shape[-1] for t in target]    # ∝ T_l
    loss = sum(4 ** l * n * m for l, (n, m) in enumerate(zip(pixels, mse))) / sum(pixels)
    return loss, mse


def lpips_net(net):
    """Frozen LPIPS on torchvision's ImageNet `net` ("vgg": the autoencoder's loss, "alex": the metric) from local
    weights only, never downloaded: (network, None), or (None, which file is missing and how to supply it)."""
    import lpips  # its own linear heads ship inside the pip package; the ImageNet weights are looked up first
    name = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}[net]  # torchvision's IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(path):
        return None, (f"LPIPS-{net}: unavailable (needs weights: torchvision's {name}, expected at {path}; "
                      f"weights are never downloaded at run time: copy it there, or point $TORCH_HOME at a "
                      f"folder holding hub/checkpoints/{name})")
    with warnings.catch_warnings():                          # lpips still passes the deprecated pretrained=True
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False), None


class HierarchicalAutoencoder(nn.Module):
    """Pyramid autoencoder (§3.1): `encode` gives every level, `decode` reconstructs from one, `loss` trains it."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        s = cfg.image_size // cfg.patch_size
        self.grids = [(s >> l, s >> l) for l in range(cfg.levels)]      # (h_l, w_l): 16², 8², 4², 2²
        self.tokens_per_level = [h * w for h, w in self.grids]          # T_l: 256, 64, 16, 4
        self.encoder, self.decoder = Encoder(cfg, self.grids), Decoder(cfg, self.grids)
        self.initialize_weights()
        object.__setattr__(self, "lpips", None)  # not a submodule: never saved, moved by .to() or put in train mode

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        ckpt = read_checkpoint(path, "ae")
        model = cls(AEConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        model.source = ckpt["path"]  # provenance: the file it came from (a latent store records its hash)
        return model.to(device).eval()

    def initialize_weights(self):
        # every Linear (embeddings, attention, MLP, bottleneck, head): Xavier-uniform weight, zero bias (ViT/DiT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # level embeddings: N(0, 1) (nn.Embedding's default, the authors' choice), the same scale as the sin/cos
        # positions, so the adaLN condition is distinct for each level from step one
        for table in (self.encoder.level_embed, self.decoder.level_embed):
            nn.init.normal_(table.weight, std=1.0)
        # adaLN-Zero (DiT): zero modulation → zero gates, so every decoder block starts as the identity
        for block in self.decoder.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def encode(self, x):
        """x (B, 3, H, W) in [0, 1] → list over levels of latents (B, T_l, C) in [-1, 1]."""
        S = self.cfg.image_size
        if self.encoder is None:
            raise ValueError(f"encode: {self.source}: a decoder imported without its encoder (a video checkpoint)")
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, S, S):
            raise ValueError(f"encode: x has shape {tuple(x.shape)}, expected (B, 3, {S}, {S})")
        z = list(self.encoder(x).split(self.tokens_per_level, dim=1))  # [(B, T_l, C)]
        if self.cfg.variant == "cascaded":
            # ablation (§5): coarse levels are mean pools of level 0, not learned. Detached, so they train the
            # decoder only; else both could still learn coarse codes through the pooling (the authors' reason)
            for l in range(1, self.cfg.levels):
                z[l] = mean_pool_tokens(z[l - 1].detach(), *self.grids[l - 1])  # (B, T_l, C)
        return z

    def decode(self, z, level):
        """z: list over levels of (B, T_l, C) (None: zeros); level: the one level kept, int or (B,) long. Returns the
        output pyramid [(B, 3, H/2^l, W/2^l)], unclamped: inference uses level 0, the rest helps training (§3.1)."""
        if len(z) != self.cfg.levels:
            raise ValueError(f"decode: z has {len(z)} levels, expected {self.cfg.levels}")
        ref = next(t for t in z if t is not None)                          # batch size, dtype, device of the zeros
        z = torch.cat([t if t is not None else ref.new_zeros(len(ref), n, self.cfg.channels)
                       for t, n in zip(z, self.tokens_per_level)], dim=1)  # (B, T, C)
        if isinstance(level, int) and not 0 <= level < self.cfg.levels:
            raise ValueError(f"decode: level {level} outside 0..{self.cfg.levels - 1}")
        level = torch.as_tensor(level, device=z.device).long().expand(len(z))  # (B,)
        keep = self.decoder.token_level[None, :] == level[:, None]  # (B, T): the others zeroed, still in the sequence
        out = self.decoder(torch.where(keep[..., None], z, 0.0), level)    # (B, T, 3·p·p)
        return [unpatchify(tokens, self.cfg.patch_size, h, w)              # (B, 3, h·p, w·p)
                for tokens, (h, w) in zip(out.split(self.tokens_per_level, dim=1), self.grids)]

    def load_lpips(self, net=None):
        """Attach the loss's frozen LPIPS (None: LPIPS(VGG) from local weights, else FileNotFoundError saying how)."""
        net, why = (net, None) if net is not None else lpips_net("vgg")
        if net is None:
            raise FileNotFoundError(f"{why}; or train without the perceptual term: --lpips_weight=0")
        object.__setattr__(self, "lpips", net.eval().requires_grad_(False))
        return net

    def loss(self, x, level=None, generator=None):
        """The whole objective (§3.1) for frames x (B, 3, H, W) in [0, 1], the kept level drawn uniformly per sample
        unless given. Returns (loss, stats): loss, mse0..mse{L-1} (per-pixel MSE per output level) and lpips (if
        lpips_weight > 0) as detached 0-dim tensors; reading one waits for the device, so log only every N steps."""
        if level is None:
            level = torch.randint(self.cfg.levels, (x.shape[0],), device=x.device, generator=generator)
        pred = self.decode(self.encode(x), level)            # whole output pyramid, whatever level was kept
        loss, mse = pyramid_mse(pred, box_pyramid(x, self.cfg.levels))
        stats = {f"mse{l}": m for l, m in enumerate(mse)}
        if self.cfg.lpips_weight > 0:
            if self.lpips is None:
                self.load_lpips()
            # perceptual term on the full-resolution output only; normalize=True maps [0, 1] to [-1, 1]
            perceptual = self.lpips.to(x.device)(pred[0], x, normalize=True).mean()
            loss = loss + self.cfg.lpips_weight * perceptual
            stats["lpips"] = perceptual
        return loss, {k: v.detach() for k, v in (stats | {"loss": loss}).items()}

    forward = loss  # calling the model runs the objective, so DistributedDataParallel(model)(x) syncs gradients


# ----------------------------------------------------------------------------- checkpoints, latents, the authors' files
# train.py's checkpoints: {"model", "step", "optimizers", "config": {"stage", "format", "model", "rollout", "run",
# ...}}. Format 3: the authors' sin/cos tables and FramePack packing order; other formats are refused, never misread.
CHECKPOINT_FORMAT = 3


def newest_checkpoint(folder):
    return max(glob.glob(os.path.join(folder, "ckpt-*.pt")), default=None)  # names sort by step


def read_checkpoint(path, stage):
    """The checkpoint dict ("path" added) of a file, or of a run folder's newest loadable one; `stage`: "ae"/"video"."""
    files = sorted(glob.glob(os.path.join(path, "ckpt-*.pt")), reverse=True) if os.path.isdir(path) else [path]
    if not files or not os.path.isfile(files[0]):
        raise FileNotFoundError(f"{path}: no checkpoint there; train it first (python train.py --stage {stage})")
    for file in files:
        try:
            ckpt = torch.load(file, map_location="cpu", weights_only=False, mmap=True)
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
            if file == files[-1]:
                raise ValueError(f"{file}: cannot load this checkpoint ({e})") from None
            print(f"skipping {file}: cannot load it ({e}); trying the one before")
            continue
        found = [ckpt.get("config", {}).get(k) for k in ("stage", "format")] if isinstance(ckpt, dict) else [None] * 2
        if found != [stage, CHECKPOINT_FORMAT]:
            raise ValueError(f"{file}: a checkpoint of stage {found[0]!r}, format {found[1] or 1}; expected stage "
                             f"{stage!r}, format {CHECKPOINT_FORMAT} (another version of this code wrote it: retrain)")
        return ckpt | {"path": file}


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit():
    """The commit of this code, recorded next to every output ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def write_latents(root, key, levels, actions):
    """The latent store (train.py --stage encode): KEY/l{level}.npy (frames, T_l, C) float16 and KEY/actions.npy per
    video; meta.json (grids, channels, `ae_sha256`: the autoencoder that made it) first, index.json last."""
    done = os.path.join(root, key, "actions.npy")
    Path(done).unlink(missing_ok=True)              # rewriting: unmark first
    for level, z in enumerate(levels):
        data.atomic_write(os.path.join(root, key, f"l{level}.npy"), lambda tmp: np.save(tmp, np.asarray(z, np.float16)))
    data.atomic_write(done, lambda tmp: np.save(tmp, np.asarray(actions, np.float32)))  # last: marks the key complete


def has_latents(root, key, levels):
    """Whether write_latents finished for `key` (actions.npy is written last), so encoding can resume."""
    names = [f"l{l}.npy" for l in range(levels)] + ["actions.npy"]
    return all(os.path.exists(os.path.join(root, key, n)) for n in names)


def read_latents(root, key, level, start, stop):
    path = os.path.join(root, key, f"l{level}.npy")
    z = np.array(np.load(path, mmap_mode="r")[start:stop])
    if len(z) != stop - start:                      # the store's index.json promised more frames
        raise ValueError(f"{path}: frames [{start}, {stop}) requested, the file holds {start + len(z)} or fewer")
    return z


# the authors' weights (Hugging Face charatan/millivid): their key prefix -> ours, first match wins; same architecture
OFFICIAL_AE = [("encoder.transformer.blocks.", "encoder.blocks."), ("encoder.patchify.", "encoder.patch_embed.proj."),
               ("encoder.level_embedding.", "encoder.level_embed."), ("encoder.bottleneck.", "encoder.bottleneck."),
               ("decoder.transformer.blocks.", "decoder.blocks."), ("decoder.unbottleneck.", "decoder.in_proj."),
               ("decoder.level_embedding.", "decoder.level_embed."), ("decoder.unpatchify.", "decoder.head.")]


def official_state_dict(source):
    """The state dict of an authors' checkpoint: `source` is a file path, a torch.save dict with "model", or that."""
    if isinstance(source, (str, Path)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{source}: no such checkpoint file (the authors' releases are on the Hugging "
                                    f"Face hub, charatan/millivid; download them yourself, see the README)")
        try:  # tensors and plain containers only: nothing in the file is executed
            source = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{source}: holds objects beyond tensors ({str(e).splitlines()[0][:120]}); if you trust "
                             "it, keep its weights alone: torch.save({'model': torch.load(path, weights_only=False)"
                             "['model']}, path)") from None
    return source.get("model", source)


def load_official(module, state, rules, skip=(), name="checkpoint"):
    """Load an authors' state dict into `module` by `rules` (their prefix, ours), keys under a `skip` prefix left
    out: every key must find a place, every entry of module.state_dict() a value of its shape, or an error names it."""
    ours, mapped = module.state_dict(), {}
    for key, value in state.items():
        if key.startswith(tuple(skip)):
            continue
        new = next((mine + key[len(theirs):] for theirs, mine in rules if key.startswith(theirs)), None)
        if new not in ours:
            raise KeyError(f"{name}: key {key!r} has no counterpart in {type(module).__name__}")
        if value.shape != ours[new].shape:
            raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, {new} here {tuple(ours[new].shape)}")
        mapped[new] = value
    if missing := [k for k in ours if k not in mapped]:   # named as the authors' file would name them
        theirs = [next((t + k[len(m):] for t, m in rules if k.startswith(m)), k) for k in missing]
        raise KeyError(f"{name}: {len(missing)} keys missing, e.g. {', '.join(theirs[:3])}")
    module.load_state_dict(mapped)
    return module.eval()


def from_official(source, cfg=None):
    """The authors' autoencoder from their autoencoder_3zg3ovzdhnun_128000.ckpt (its training loss, `lpips.*`, left
    out), or only its decoder (no encode()) from a video checkpoint (`dit.*`) that holds a copy of it."""
    state = official_state_dict(source)
    model = HierarchicalAutoencoder(cfg or ae_config("paper"))
    if not any(k.startswith("encoder.") for k in state):
        if not any(k.startswith("decoder.") for k in state):
            raise KeyError(f"{source}: neither encoder.* nor decoder.* keys: not an autoencoder or video checkpoint")
        model.encoder = None
    model.source = str(source) if isinstance(source, (str, Path)) else "a state dict"
    return load_official(model, state, OFFICIAL_AE, skip=("lpips.", "dit."), name=model.source)


def read_pyramid(path, grids, channels, action_dim=6):
    """The authors' latent file (`.pyramid`, their test latents in charatan/loopcraft): per video, sections s = 0..L-1,
    each holding for every frame the bf16 latents (C, h_l, w_l) of levels s..L-1, then its float32 action row [action,
    x, y, z, yaw, pitch]. Section 0 holds all; returned as float32: per level (F, T_l, C), and (F, action_dim)."""
    level_bytes = [2 * channels * h * w for h, w in grids]
    row = sum(level_bytes) + 4 * action_dim                   # one frame of section 0
    per_frame = sum(sum(level_bytes[s:]) + 4 * action_dim for s in range(len(grids)))  # over all sections
    size = os.path.getsize(path)
    if size == 0 or size % per_frame:
        raise ValueError(f"{path}: {size} bytes is not a whole number of frames of {per_frame} bytes (levels {grids} "
                         f"x {channels} channels in bf16 + {action_dim} float32 actions): truncated or another layout")
    frames = np.fromfile(path, np.uint8, count=size // per_frame * row).reshape(-1, row)  # (F, row) section 0
    *parts, actions = np.split(frames, np.cumsum(level_bytes), axis=1)  # per level (F, 2·C·h·w) bytes, then actions
    levels = []
    for (h, w), part in zip(grids, parts):                                 # bf16 -> float32 is exact
        z = torch.from_numpy(part.copy()).view(torch.bfloat16).float().reshape(-1, channels, h * w)  # (F, C, h·w)
        levels.append(z.transpose(1, 2).contiguous().numpy())             # (F, h·w, C), tokens row-major as our store
    actions = actions.copy().view(np.float32)                              # (F, action_dim)
    if not (all(np.isfinite(z).all() for z in levels) and np.isfinite(actions).all()):
        raise ValueError(f"{path}: non-finite latents or actions")
    return levels, actions


# ----------------------------------------------------------------------------- inspecting the hierarchy
@torch.no_grad()
def level_psnr(model, x):
    """What each level keeps of frames x (B, 3, H, W) (§5 Q1, Fig. 5): ([PSNR per level], [level-0 outputs])."""
    z = model.encode(x)
    images = [model.decode(z, level)[0].clamp(0, 1) for level in range(len(z))]  # (B, 3, H, W) each
    return [(-10 * torch.log10((im - x).square().mean())).item() for im in images], images


def to_uint8(images):
    """Decoder output (N, 3, H, W) float in [0, 1] -> np.uint8 (N, H, W, 3): what a viewer (and a metric) sees."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def spread_frames(root, keys, count):
    """Up to `count` frames of a store, spread over the videos `keys` and 16 moments each: (N, 3, H, W)."""
    index = data.load_index(root)
    picks = [(key, f) for key in keys for f in range(0, index[key], max(1, index[key] // 16))]
    picks = picks[:: max(1, len(picks) // count)][:count]
    frames = np.stack([data.read_frames(root, key, f, f + 1)[0] for key, f in picks])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255


def save_levels_image(path, x, images):
    """Fig. 5-style PNG: a row per frame of x (B, 3, H, W): ground truth, then its level-0 output decoded from
    each level alone (finest to coarsest); columns labelled, small frames enlarged (nearest) to >= 128 pixels."""
    grid = torch.cat([torch.cat(list(column), dim=1) for column in [x, *images]], dim=2)  # (3, B·H, (L+1)·W)
    k = -(-128 // x.shape[-1])                                                             # ceil(128 / W)
    pixels = to_uint8(grid[None])[0].repeat(k, 0).repeat(k, 1)                             # (k·B·H, k·(L+1)·W, 3)
    canvas = Image.fromarray(np.pad(pixels, ((14, 0), (0, 0), (0, 0))))                    # a 14-pixel caption bar
    for i, label in enumerate(["ground truth"] + [f"from level {l}" for l in range(len(images))]):
        ImageDraw.Draw(canvas).text((i * k * x.shape[-1] + 3, 1), label, fill="white")
    data.atomic_write(path, lambda tmp: canvas.save(tmp))


def main(argv=None):
    """python tokenizer.py levels CKPT [CKPT ...] --data DIR: per checkpoint, the PSNR of each level decoded alone."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["levels"])
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files or autoencoder run folders")
    parser.add_argument("--data", required=True, help="frame store (e.g. runs/toy/data/test)")
    parser.add_argument("--frames", type=int, default=256, help="frames scored, spread over the store")
    parser.add_argument("--image", help="write the Fig. 5-style comparison here (PNG): truth, then levels 0..L-1")
    parser.add_argument("--show", type=int, default=3, help="frames per checkpoint in the image")
    args = parser.parse_args(argv)
    x = spread_frames(args.data, sorted(data.load_index(args.data)), args.frames)  # (N, 3, H, W)
    shown = range(0, len(x), max(1, len(x) // args.show))[:args.show]
    decoded = []                                             # per checkpoint, per level: the `--show` frames
    for path in args.checkpoints:
        model = HierarchicalAutoencoder.from_checkpoint(path)
        psnr, images = level_psnr(model, x)
        print(f"{model.cfg.variant:>12} {path}: " + "  ".join(f"L{l} {p:5.2f} dB" for l, p in enumerate(psnr)))
        decoded.append([im[shown] for im in images])
    if args.image:  # per checkpoint its `--show` rows, one below the other
        save_levels_image(args.image, torch.cat([x[shown]] * len(decoded)), [torch.cat(c) for c in zip(*decoded)])


if __name__ == "__main__":
    main()
