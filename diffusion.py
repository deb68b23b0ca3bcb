"""Video diffusion over the latent pyramid: MilliVid §3.2 and App. A.2 (sampling cost: App. A.3).

One transformer (DiT-B) is shared by every hierarchy level and every rollout step. One forward pass is
one rollout step's token sequence (see rollout.py): CONTEXT tokens are clean, DENOISED tokens are
noisy, and every token knows its (frame, level, row, col) and the action of its frame. The model
predicts v (v-prediction, Salimans & Ho 2022) under the cosine logSNR schedule of Simple Diffusion
(Hoogeboom et al. 2023), shift 1.0 for every level. Generation of one step is deterministic DDIM.

The dense FramePack baseline (§5 Q3, Fig. 11, App. A.2) is the same network with another input
stage: it sees only level-0 latents, and older context frames are packed by space-to-depth with a
2^k x 2^k kernel (one Linear per group k), so a frame in group k costs T_0 / 4^k tokens.

It knows nothing of rollout strategies: `loss` and `ddim_sample` take one step's tokens and a mask of
those to denoise (rollout.py lays steps out; `python rollout.py bench` runs `bench` on a real step).
"""
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.attention
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import data
import tokenizer
from tokenizer import AdaLNBlock, modulate, per_token, sincos_embed


@dataclass
class DiTConfig:
    # model: DiT-B (App. A.2)
    depth: int = 12               # transformer blocks
    width: int = 768                # divisible by heads; >= 12 (3D sin/cos: width//6 frequencies per axis)
    heads: int = 12               # attention heads
    mlp_ratio: int = 4            # MLP hidden width / width
    channels: int = 32              # latent channels C of the autoencoder
    levels: int = 4                 # hierarchy levels; for the dense model: packing groups k = 0..levels-1
    num_actions: int = 3            # 0 forward, 1 left, 2 right
    dense: bool = False             # the dense FramePack input stage (§5 Q3): level-0 tokens, groups packed
    # diffusion (App. A.2 "Generative Model Training Setup", "Inference Details")
    shift: float = 1.0              # schedule shift; the paper uses 1.0 for every level
    logsnr_bound: float = 15.0      # logSNR runs from +15 (t = 0) to -15 (t = 1)
    cfg_dropout: float = 0.1        # classifier-free-guidance dropout per sample
    # video training (App. A.2): per-device batch, Muon + AdamW, linear warmup (train.py clips at 1.0)
    batch_size: int = 48          # sequences (rollout steps) per device and step
    steps: int = 192_000          # optimizer steps
    lr: float = 1e-3              # learning rate (Muon and AdamW)
    weight_decay: float = 0.01    # decoupled weight decay
    warmup: int = 2000            # steps of linear warmup

    def __post_init__(self):
        for ok, name, expected in [
                (self.width >= 12 and self.width % self.heads == 0, "width", f">= 12 (3D sin/cos) and divisible "
                 f"by heads={self.heads}"),
                (self.shift > 0, "shift", "> 0"),
                (0 <= self.cfg_dropout <= 1, "cfg_dropout", "in [0, 1]"),
                (self.steps >= 1 and self.batch_size >= 1 and self.warmup >= 0, "steps", ">= 1, batch_size >= 1"),
                (math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")]:
            if not ok:
                raise ValueError(f"DiTConfig.{name} = {getattr(self, name)!r}: expected {expected}")


def _latents(preset):  # what the DiT models: the latent channels and levels of the preset's autoencoder
    return {k: getattr(tokenizer.ae_config(preset), k) for k in ("channels", "levels")}


PRESETS = {
    "paper": {},
    # toy: 64/16/4/1 tokens per level, 320-token steps; minutes on one GPU
    "toy": dict(depth=6, width=384, heads=6, batch_size=32, steps=20_000, warmup=500, **_latents("toy")),
    # tiny: 16/4/1 tokens per level, 64-token steps; CPU tests
    "tiny": dict(depth=2, width=48, heads=2, batch_size=16, steps=400, warmup=40, **_latents("tiny")),
    # spin: tiny's tokens, a 4 x 144 DiT (1.6 M parameters) that learns to follow a turn
    "spin": dict(depth=4, width=144, heads=4, batch_size=16, steps=4000, warmup=200, **_latents("spin")),
}


def dit_config(preset="paper", **overrides) -> DiTConfig:
    """The named preset's DiTConfig with strict `overrides` (data.make_config)."""
    return data.make_config(DiTConfig, PRESETS, preset, overrides)


# ----------------------------------------------------------------------------------------------------
# Noise schedule and v-prediction (App. A.2: cosine schedule of Simple Diffusion, shift 1.0)

def logsnr(t, shift=1.0, bound=15.0):
    """Shifted cosine schedule in logSNR form; t in [0, 1] maps to logSNR in [+bound, -bound] + 2 ln shift."""
    u_min, u_max = math.atan(math.exp(-bound / 2)), math.atan(math.exp(bound / 2))
    u = u_min + t * (u_max - u_min)
    # logSNR(t) = -2 ln tan(u) + 2 ln(shift)
    return -2 * torch.log(torch.tan(u)) + 2 * math.log(shift)


def alpha_sigma(t, shift=1.0, bound=15.0):
    """alpha = sqrt(sigmoid(logSNR)), sigma = sqrt(sigmoid(-logSNR)), so alpha^2 + sigma^2 = 1."""
    lam = logsnr(t, shift, bound)
    return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()


def token_times(t, denoised):
    """Per-token diffusion times (B, T) from the model's per-sample pair t (B, 2) = (CONTEXT's, DENOISED's)."""
    return torch.where(denoised, t[:, 1:], t[:, :1])


def timestep_embedding(t, dim=256, max_period=10_000):
    """Sin/cos features of the diffusion time (DiT): [cos(1000·t·ω_i), sin(1000·t·ω_i)], t in [0, 1] scaled to
    DiT's [0, 1000], ω_i = max_period^(-i/(dim/2-1)) (the authors' table, with its -1: see sincos_embed)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    angles = 1000 * t.float()[:, None] * freqs  # (U, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sincos_3d(frame, row, col, width):
    """3D sin/cos position (App. A.2): width//6 frequencies each for frame, row, col, zero-padded to width
    when 6 does not divide it (as the authors do). (B, T) -> (B, T, width)."""
    pe = torch.cat([sincos_embed(p, width // 6 * 2) for p in (frame, row, col)], dim=-1)  # (B, T, 6·(width//6))
    return F.pad(pe, (0, width - pe.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# The DiT's blocks are tokenizer.AdaLNBlock with per-token conditioning: each token has its own (t, level,
# action), but a batch holds few distinct ones; modulating once per distinct value saves a fifth (paper)
# to a third (toy) of the training FLOPs against a per-token Linear, with the same numbers.

class FinalLayer(nn.Module):
    """adaLN + Linear back to the C latent channels (DiT); zero-initialised, so v starts at 0."""

    def __init__(self, width, channels):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, channels)

    def forward(self, x, c, index):
        with torch.autocast(c.device.type, enabled=False):  # fp32 modulation rows (see VideoDiT.conditioning)
            rows = self.adaLN_modulation(c.float())
        shift, scale = (per_token(m, index) for m in rows.chunk(2, dim=-1))  # 2 x (B, T, D)
        return self.out(modulate(self.norm(x), shift, scale))


def space_to_depth(a, frames, h, w, p):
    """Pack p x p patches of row-major level-0 cells: (B, frames*h*w, D) -> (B, frames*(h/p)*(w/p), D*p*p).

    The packed vector of a patch is channel-major (c, ph, pw): channel 0 of its p*p tokens row-major, then
    channel 1, ...: the authors' order, which their packing Linears were trained on."""
    B, D = a.shape[0], a.shape[-1]
    a = a.reshape(B, frames, h // p, p, w // p, p, D)  # (B, F, h/p, ph, w/p, pw, D)
    return a.permute(0, 1, 2, 4, 6, 3, 5).reshape(B, frames * (h // p) * (w // p), D * p * p)


# ----------------------------------------------------------------------------------------------------
# The video DiT

class VideoDiT(nn.Module):
    """v = model(x_t, t, frame, level, row, col, action): one rollout step's tokens in, v (B, T, C) out.

    x_t (B, T, C); t (B, T) in [0, 1] per token; frame/level/row/col long (B, T) or (T,); action long
    (B, T) or (T,) with -1 = dropped (zero embedding, for CFG). Frames are made relative inside.
    Dense FramePack (cfg.dense): tokens are raw level-0 tokens laid out by rollout.step_layout(dense=True)
    (level-major, frame, row-major; `level` = group k); v is returned for the k = 0 tokens and is 0 on
    the packed context groups."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, C = cfg.width, cfg.channels
        if cfg.dense:
            # one Linear(C 4^k -> D) per group k: a 2^k x 2^k patch of level-0 tokens becomes one token
            self.embed = nn.ModuleList([nn.Linear(C * 4 ** k, D) for k in range(cfg.levels)])
        else:
            self.embed = nn.Linear(C, D)  # one token embedding shared by every level (§3.2)
        self.t_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.level_embed = nn.Embedding(cfg.levels, D)
        self.action_embed = nn.Embedding(cfg.num_actions, D)
        self.blocks = nn.ModuleList([AdaLNBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final = FinalLayer(D, C)
        self.checkpointing = False  # activation checkpointing per block (train.py --checkpointing): less memory
        self.initialize_weights()

    @classmethod
    def from_checkpoint(cls, path, device="cpu"):
        """The trained video model of a checkpoint file (or a run folder's newest), rebuilt from the config
        stored in it alone; in eval mode on `device`. (Its rollout strategy: rollout.RolloutConfig.from_checkpoint.)"""
        ckpt = tokenizer.read_checkpoint(path, "video")
        model = cls(DiTConfig(**ckpt["config"]["model"]))
        model.load_state_dict(ckpt["model"])
        model.source = ckpt["path"]  # provenance: the file it came from
        return model.to(device).eval()

    def initialize_weights(self):
        # Linear layers (token embeddings, attention, MLP): Xavier-uniform, zero bias (DiT)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # timestep MLP: N(0, 0.02) (DiT); the level and action tables: N(0, 1) (nn.Embedding's default, the
        # authors' choice), on the scale of the sin/cos features they are added to
        for m in [self.t_embed[0], self.t_embed[2]]:
            nn.init.normal_(m.weight, std=0.02)
        for m in [self.level_embed, self.action_embed]:
            nn.init.normal_(m.weight, std=1.0)
        # adaLN-Zero: every block's shift/scale/gate start at 0, so each block starts as the identity
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # final layer: zero modulation and zero output Linear -> the model predicts exactly v = 0 at init
        for m in [self.final.adaLN_modulation[-1], self.final.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def conditioning(self, t, denoised, level, action):
        """c = timestep_embedding(t) + level_embedding(level) + action_embedding(action) for every (sample, role,
        level, action) the batch could hold, a table of static size B·2·L·(A+1) computed in fp32 (its rows are
        shared by thousands of tokens, whose gradients they sum), and each token's row: c (U, D), index (B, T).
        No torch.unique: nothing in the step waits for the host."""
        B, L, A = t.shape[0], self.cfg.levels, self.cfg.num_actions + 1  # action -1 .. A-2 -> row 0 .. A-1
        with torch.autocast(t.device.type, enabled=False):
            # action -1 means dropped (CFG): a zero vector instead of an embedding
            a = torch.cat([self.action_embed.weight.new_zeros(1, self.cfg.width), self.action_embed.weight]).float()
            c = (self.t_embed(timestep_embedding(t.flatten())).float()[:, None, None]  # (B·2, 1, 1, D)
                 + self.level_embed.weight.float()[None, :, None] + a[None, None])      # (B·2, L, A, D)
        sample = torch.arange(B, device=t.device)[:, None]
        index = ((sample * 2 + denoised.long()) * L + level) * A + action + 1           # (B, T)
        return c.flatten(0, 2), index

    def pack(self, x_t, denoised, frame, level, row, col, action, packing=None):
        """Dense FramePack input: space-to-depth each group k with 2^k x 2^k on the level-0 grid. packing:
        ((h, w), frames per group k), known on the host before the step (rollout.dense_packing); None reads
        it from the layout, waiting for the device once."""
        if packing is None:
            if not (level == level[:1]).all() or (level[:, 1:] < level[:, :-1]).any():
                raise ValueError("VideoDiT(dense): level (group k) must be level-major and equal across "
                                 "the batch, as rollout.step_layout(dense=True) lays it out")
            counts = torch.bincount(level[0], minlength=self.cfg.levels)
            h, w = int(row.max()) + 1, int(col.max()) + 1
            packing = ((h, w), [int(n) // (h * w) for n in counts])
        (h, w), group_frames = packing
        tokens, meta, start = [], [], 0
        for k, frames in enumerate(group_frames):
            p, cells = 2 ** k, slice(start, start + frames * h * w)
            if h % p or w % p:
                raise ValueError(f"VideoDiT(dense): group {k}'s {p}x{p} patches do not tile the {h}x{w} grid")
            tokens.append(self.embed[k](space_to_depth(x_t[:, cells], frames, h, w, p)))  # (B, F_k h w / p², D)
            # a packed token keeps its top-left token's (role, frame, level, action), equal over the patch,
            # and takes its (row, col) in the downsampled grid
            m = torch.stack([denoised.long(), frame, level, row // p, col // p, action], -1)[:, cells]  # (B, n, 6)
            meta.append(space_to_depth(m, frames, h, w, p)[..., ::p * p])  # (B, F_k h w / p², 6): top-left token
            start += frames * h * w
        denoised, frame, level, row, col, action = torch.cat(meta, 1).unbind(-1)  # (B, T') each
        return torch.cat(tokens, 1), denoised.bool(), frame, level, row, col, action, group_frames[0] * h * w

    def forward(self, x_t, t, denoised, frame, level, row, col, action, packing=None):
        """t (B, 2): each sample's diffusion time of its CONTEXT tokens and of its DENOISED tokens; denoised
        (B, T) or (T,) bool says which token is which."""
        B, T, _ = x_t.shape
        denoised, frame, level, row, col, action = (
            a.expand(B, T) for a in (denoised, frame, level, row, col, action))
        L, A = self.cfg.levels, self.cfg.num_actions
        # checked on the device: no host sync (on a GPU a bad value fails the step asynchronously)
        torch._assert_async(((level >= 0) & (level < L)).all() & ((action >= -1) & (action < A)).all(),
                            f"VideoDiT: level must lie in [0, {L}) and action in [-1, {A})")
        if self.cfg.dense:
            h, denoised, frame, level, row, col, action, n0 = self.pack(x_t, denoised, frame, level, row, col,
                                                                       action, packing)
        else:
            h, n0 = self.embed(x_t), T  # (B, T, D)
        # frame index relative to the step's earliest frame: training chunks and rollout buffers agree
        frame = frame - frame.min(dim=1, keepdim=True).values
        # the residual stream stays fp32 under bf16 autocast (the blocks' Linears and attention run in
        # bf16): a bf16 stream would round away the small, near-zero-gated block updates of early training
        h = h.float() + sincos_3d(frame, row, col, self.cfg.width)
        c, index = self.conditioning(t.float(), denoised, level, action)
        for block in self.blocks:  # checkpointing: keep each block's input only, recompute the rest in backward
            recompute = self.checkpointing and torch.is_grad_enabled()
            h = checkpoint(block, h, c, index, use_reentrant=False) if recompute else block(h, c, index)
        v = self.final(h[:, :n0], c, index[:, :n0])  # (B, n0, C): only k = 0 tokens are ever denoised
        return F.pad(v, (0, 0, 0, T - n0))  # (B, T, C); zeros on packed context groups


# The authors' video checkpoints (millivid_192k.ckpt, full_resolution_rollout_192k.ckpt: the "universal" model;
# framepack_192k.ckpt: dense) name our parts so (tokenizer.load_official); `decoder.*`, when present, is
# their copy of the autoencoder's decoder (tokenizer.from_official reads it)
OFFICIAL_DIT = [("dit.dit.dit.blocks.", "blocks."), ("dit.dit.time_embedding.mlp.", "t_embed."),
                ("dit.dit.level_embedding.", "level_embed."), ("dit.patchify.", "embed."),
                ("dit.dit.action_encoder.action_embedding.", "action_embed."), ("dit.unpatchify.linear.", "final.out."),
                ("dit.unpatchify.adaLN_modulation.", "final.adaLN_modulation.")]


def from_official(source, cfg=None):
    """The authors' video model in our VideoDiT, in eval mode. cfg: the paper's DiT-B, dense (FramePack) when
    the file packs context with one Linear per group (`dit.patchify.0.weight`), by default."""
    state = tokenizer.official_state_dict(source)
    cfg = cfg or dit_config("paper", dense="dit.patchify.0.weight" in state)
    name = str(source) if isinstance(source, (str, Path)) else "a state dict"
    model = tokenizer.load_official(VideoDiT(cfg), state, OFFICIAL_DIT, skip=("decoder.",), name=name)
    model.source = name
    return model


# ----------------------------------------------------------------------------------------------------
# Objective and sampler

def _config_of(model):
    """The DiTConfig behind a model (DDP-wrapped or not); paper defaults for stand-in callables in tests."""
    return getattr(getattr(model, "module", model), "cfg", DiTConfig())


def _noise(fn, shape, generator, like):
    device = generator.device if generator is not None else like.device
    return fn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def loss_noise(x, generator=None):
    """The randomness of one `loss` on clean latents x (B, T, C): t ~ U(0, 1) and a CFG-dropout draw per sample,
    ε per token. Drawn for a whole batch and then sliced, N micro-batches of B/N see what one batch of B sees."""
    return (_noise(torch.rand, (x.shape[0], 1), generator, x), _noise(torch.rand, (x.shape[0], 1), generator, x),
            _noise(torch.randn, x.shape, generator, x))


def loss(model, x, denoised, frame, level, row, col, action, cfg_drop=0.1, generator=None, keep_actions=None,
         packing=None, noise=None):
    """v-prediction MSE over the tokens to denoise (§3.2, App. A.2). x (B, T, C) clean latents; denoised
    (B, T) or (T,) bool: True for DENOISED tokens, False for CONTEXT; packing: VideoDiT.pack's; noise: loss_noise's.

    One t ~ U(0, 1) per sample for its DENOISED tokens; CONTEXT at t = 0. CFG dropout: with probability
    cfg_drop a sample's context goes to t = 1 (pure noise) and its actions are dropped (-1). The paper's
    dense FramePack model keeps its actions (App. A.2); keep_actions=None follows the model's config."""
    cfg = _config_of(model)
    keep_actions = cfg.dense if keep_actions is None else keep_actions
    B, T, _ = x.shape
    denoised, action = denoised.expand(B, T), action.expand(B, T)
    if cfg.dense:  # checked on the device, no host sync
        torch._assert_async(~(denoised & (level > 0)).any(), "loss: the dense FramePack model only predicts group "
                            "k = 0 tokens; DENOISED tokens must have level 0 (rollout.step_layout(dense=True))")
    t_sample, u, eps = noise or loss_noise(x, generator)  # one t per sample, its CFG-dropout draw, ε per token
    drop = u < cfg_drop
    # CONTEXT at t = 0 (logSNR 15, sigma 5.5e-4: clean for all purposes, and the sampler does the same),
    # or at t = 1 (pure noise) when the sample's context is dropped
    t_pair = torch.cat([drop.to(x.dtype), t_sample], 1)  # (B, 2): CONTEXT's t, DENOISED's t
    t = token_times(t_pair, denoised)  # (B, T)
    if not keep_actions:
        action = torch.where(drop, -1, action)
    alpha, sigma = (a[..., None] for a in alpha_sigma(t, cfg.shift, cfg.logsnr_bound))  # (B, T, 1)
    # forward process: x_t = α·x + σ·ε
    x_t = alpha * x + sigma * eps
    # v-target: v = α·ε − σ·x (§3.2)
    v = alpha * eps - sigma * x
    v_hat = model(x_t, t_pair, denoised, frame, level, row, col, action, packing=packing)
    # plain MSE over DENOISED tokens only (no SNR weighting); CONTEXT outputs carry no loss
    per_token = (v_hat.float() - v.float()).pow(2).mean(-1)  # (B, T)
    return (per_token * denoised).sum() / denoised.sum().clamp(min=1)


@torch.no_grad()
def ddim_sample(model, x, denoised, frame, level, row, col, action, steps=50, cfg_scale=1.0, generator=None,
                keep_actions=None, packing=None, eps=None):
    """Deterministic DDIM for one rollout step (App. A.2): returns x with its DENOISED tokens generated.

    x (B, T, C): CONTEXT tokens clean, DENOISED tokens (denoised (B, T) or (T,) True) anything (ignored). Times
    run over linspace(1, 0, steps + 1) on the training schedule; CONTEXT stays at t = 0. With cfg_scale != 1 an
    unconditional pass (context at t = 1, actions dropped unless keep_actions) guides: v = v_u + s (v_c - v_u).
    eps: the step's noise (B, T, C), else drawn from `generator` (drawn outside, the loop has no graph break).
    No host sync: the times live on the device."""
    cfg = _config_of(model)
    keep_actions = cfg.dense if keep_actions is None else keep_actions
    B, T, _ = x.shape
    denoised = denoised.expand(B, T)
    uncond_action = action if keep_actions else torch.full_like(action.expand(B, T), -1)
    eps_hat = _noise(torch.randn, x.shape, generator, x) if eps is None else eps  # one ε per token, fixed for CONTEXT
    # DENOISED start from x̂ = 0, so the first x_t is pure noise whatever the buffer holds there
    x_hat = torch.where(denoised[..., None], 0.0, x)
    ones = torch.ones(B, 1, dtype=x.dtype, device=x.device)

    def evaluate(s, t_context, action, x_hat, eps_hat):  # v̂ at time s on DENOISED, t_context on CONTEXT
        t_pair = torch.cat([t_context * ones, s * ones], 1)  # (B, 2)
        alpha, sigma = (a[..., None] for a in alpha_sigma(token_times(t_pair, denoised), cfg.shift,
                                                          cfg.logsnr_bound))  # (B, T, 1) each
        x_t = alpha * x_hat + sigma * eps_hat
        v_hat = model(x_t, t_pair, denoised, frame, level, row, col, action, packing=packing)
        return v_hat.to(x.dtype, copy=True), x_t, alpha, sigma  # a copy: CUDA graphs reuse their output memory

    for s in torch.linspace(1, 0, steps + 1, dtype=x.dtype, device=x.device)[:-1]:
        v_hat, x_t, alpha, sigma = evaluate(s, 0.0, action, x_hat, eps_hat)
        if cfg_scale != 1.0:  # classifier-free guidance: v = v_u + s (v_c - v_u); the unconditional pass as in
            v_u = evaluate(s, 1.0, uncond_action, x_hat, eps_hat)[0]  # training: context at t = 1, no actions
            v_hat = v_u + cfg_scale * (v_hat - v_u)
        # DDIM: x̂ = α·x_t − σ·v̂, ε̂ = σ·x_t + α·v̂; the next step rebuilds x_t' = α'·x̂ + σ'·ε̂
        x_hat = torch.where(denoised[..., None], alpha * x_t - sigma * v_hat, x_hat)  # only DENOISED move
        eps_hat = torch.where(denoised[..., None], sigma * x_t + alpha * v_hat, eps_hat)
    return x_hat


# ----------------------------------------------------------------------------------------------------
# Throughput benchmark (python rollout.py bench --preset tiny|toy|paper --device cpu|cuda runs it on the
# preset's real MilliVid step)

def train_flops(cfg, batch, tokens):
    """Model FLOPs of one training step, backward = 2 x forward. Per token and block: 2 (4 + 2 mlp) D^2
    for qkv, proj and MLP, 4 T D for attention; plus the C <-> D Linears. Per row of the conditioning table
    (batch x 2 roles x levels x (actions + 1)): the adaLN Linears, 2 D (6 D) per block and 2 D (2 D) final;
    per (sample, role): the timestep MLP."""
    D = cfg.width
    per_token = cfg.depth * (2 * (4 + 2 * cfg.mlp_ratio) * D * D + 4 * tokens * D) + 4 * cfg.channels * D
    rows = batch * 2 * cfg.levels * (cfg.num_actions + 1)
    table = rows * (cfg.depth * 12 * D * D + 4 * D * D) + batch * 2 * 2 * (256 * D + D * D)
    return 3 * (per_token * batch * tokens + table)


# bytes kept for backward per token and width channel, in each block (the fp32 residual stream and per-token
# modulations, bf16 Linear inputs) and outside them; measured under bf16 autocast with torch's saved-tensor hooks
# (tests/test_diffusion.py: 81.7 at widths 96-768), for attention kernels that keep no T x T matrix
SAVED_PER_BLOCK, SAVED_OUTSIDE = 82, 16


def train_memory(cfg, batch, tokens, checkpointing=False):
    """Expected peak bytes of a training step on one device: fp32 weights, gradients and optimizer state (Muon's
    momentum, AdamW's two moments: at most 16 bytes per parameter) plus the activations kept for backward;
    with checkpointing each block keeps its fp32 input (4 bytes) and one block at a time the rest."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        params = sum(p.numel() for p in VideoDiT(cfg).parameters())
    per_block = 4 if checkpointing else SAVED_PER_BLOCK
    kept = cfg.depth * per_block + (SAVED_PER_BLOCK if checkpointing else 0) + SAVED_OUTSIDE
    return 16 * params + kept * batch * tokens * cfg.width


def timed(step, iters):
    """Seconds per call of step() after two warm-up calls (CUDA-synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters


def train_step(model, objective, device):
    """One training step as a closure: forward and backward (bf16 autocast on CUDA only), AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            objective().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def cpu_name():
    try:  # Linux names the model; elsewhere the platform's word for it
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "4090": 165}


def bench(cfg, layout, device, batch, iters, rounds=3, compile=False, checkpointing=False, frames_per_step=1.0,
          sampling_steps=50):
    """Training tokens/s of VideoDiT(cfg) (all of loss(): noise, forward, backward, AdamW) on one step's
    layout (dict of (T,) tensors denoised, frame, level, row, col) against a plain nn.TransformerEncoder of
    the same width, depth, heads and sequence length, in the same run; then sampling: network evaluations and
    generated frames per second (frames_per_step: new frames per rollout step, sampling_steps per rollout step).
    compile: eager and torch.compile'd side by side. On CUDA also step time, peak memory and MFU (bf16)."""
    denoised, frame, level, row, col = (layout[k].to(device) for k in ("denoised", "frame", "level", "row", "col"))
    tokens = len(frame)
    hardware = torch.cuda.get_device_name() if device == "cuda" else cpu_name()
    print(f"bench: device {device} ({hardware}, {torch.get_num_threads()} CPU threads), batch {batch} x {tokens} "
          f"tokens, DiT depth {cfg.depth} width {cfg.width} heads {cfg.heads}, checkpointing {checkpointing}")
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, tokens, cfg.channels, device=device, generator=g)
    action = torch.randint(0, cfg.num_actions, (batch, tokens), device=device, generator=g)
    dit = VideoDiT(cfg).to(device)
    dit.checkpointing = checkpointing
    variants = {"VideoDiT": dit} | ({"VideoDiT compiled": torch.compile(dit)} if compile else {})
    steps, memory = {}, {}
    for name, model in variants.items():
        steps[name] = train_step(model, lambda m=model: loss(m, x, denoised, frame, level, row, col, action), device)
        if device == "cuda":  # peak memory of each step alone, before the baseline exists
            torch.cuda.reset_peak_memory_stats()
            steps[name]()
            memory[name] = torch.cuda.max_memory_allocated() / 2**30
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(cfg.width, cfg.heads, cfg.mlp_ratio * cfg.width, dropout=0.0,
                                   activation="gelu", batch_first=True, norm_first=True),
        cfg.depth, enable_nested_tensor=False).to(device)
    h = torch.randn(batch, tokens, cfg.width, device=device, generator=g)
    steps["nn.TransformerEncoder"] = train_step(encoder, lambda: encoder(h).float().pow(2).mean(), device)
    # alternate the models and keep each one's best round: fair on a shared, noisy machine
    sec = dict.fromkeys(steps, math.inf)
    for _ in range(rounds):
        for name, step in steps.items():
            sec[name] = min(sec[name], timed(step, iters))
    gpu = torch.cuda.get_device_name() if device == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    if device == "cuda":  # the attention kernel: flash where it can run (Hopper, bf16), checked by forcing it
        q = torch.randn(batch, cfg.heads, tokens, cfg.width // cfg.heads, device=device, dtype=torch.bfloat16)
        try:
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, q, q)
            print("  attention: the flash kernel runs for these shapes in bf16 (torch picks it first)")
        except RuntimeError as e:
            print(f"  attention: NOT flash ({str(e).splitlines()[0]}): memory-efficient or math kernel")
    for name, t in sec.items():
        extra = f", peak memory {memory[name]:.1f} GiB" if name in memory else ""
        extra += f", MFU {100 * train_flops(cfg, batch, tokens) / t / (peak * 1e12):.1f}%" if peak and extra else ""
        print(f"  train  {name:22s} {batch * tokens / t:12,.0f} tokens/s  ({1e3 * t:8.1f} ms/step{extra})")
    print(f"  ratio VideoDiT / TransformerEncoder: {sec['nn.TransformerEncoder'] / sec['VideoDiT']:.2f}x "
          "(goal on CPU >= 0.80x)")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
        for name, model in variants.items():  # a rollout step's DDIM loop: `n` evaluations, noise from outside
            n, eps = 5, torch.randn(x.shape, device=device, generator=g)
            t = timed(lambda: ddim_sample(model, x, denoised, frame, level, row, col, action, steps=n, eps=eps), 1) / n
            print(f"  sample {name:22s} {1 / t:12,.1f} network evaluations/s of {batch} sequences, "
                  f"{batch * frames_per_step / (sampling_steps * t):,.2f} frames/s ({sampling_steps} DDIM steps)")
