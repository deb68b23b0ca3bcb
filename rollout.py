"""Rollout strategies as exact step enumerations, and the generation loop (paper §3.2, Fig. 2, Fig. 10,
Fig. 11, App. A.2-A.3). The heart of MilliVid.

A video is generated in chunks of N frames; inside a chunk a fixed list of rollout steps runs, one transformer
sequence each. A step is a grid sel[level, frame] of UNSEEN / CONTEXT / DENOISED: every non-UNSEEN cell becomes that
level's T_l = T_0 / 4^l tokens, clean (CONTEXT) or generated (DENOISED). MilliVid rolls the coarsest level far ahead,
then upsamples level by level; every step sees the finest most recent frame and the coarse plan of the future, so
super-resolution and temporal rollout cannot disagree (the stop/go sign of §3.2). All its steps have the same token
count, so training stacks randomly drawn steps into one batch without padding (§3.2, Training Procedure).

Here: `RolloutConfig`, each strategy's steps, chunk sliding, cost figures, training data, generation; commands:

    python rollout.py show millivid --frames-per-level=1,4,16 --extra-budget=256 --tokens 256
    python rollout.py show framepack --preset toy --dense --figures --image framepack.png
    python rollout.py cost --preset paper
    python rollout.py bench --preset toy --device cuda     # DiT training throughput on a real step
"""
import argparse
import json
import math
import os
import time
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import torch
from PIL import Image, ImageDraw

import data
import diffusion
import tokenizer

UNSEEN, CONTEXT, DENOISED = 0, 1, 2
SYMBOLS = ".CD"  # the text-grid notation (tests/fixtures/rollout-example-3-levels.txt)
STRATEGIES = ("millivid", "framepack", "fullres", "framepack_hier", "framepack_mirrored", "upscale")


@dataclass
class RolloutConfig:
    """A rollout strategy and its settings (§4 Models, App. A.2 "Model-Specific Details"), paper defaults:
    3840 / 3840 / 3584 tokens per step. A video checkpoint stores it beside the DiT's config."""
    strategy: str = "millivid"                    # one of STRATEGIES; "framepack" is the paper's dense baseline
    frames_per_level: tuple = (3, 12, 48, 192)    # MilliVid W_l, finest first; its length is the level count
    extra_budget: int = 768                       # MilliVid: extra context tokens of the target level
    framepack_denoised: int = 3                   # FramePack d: 3 x 256 + 3072 context = 3840 tokens (dense)
    framepack_context: tuple = (3, 12, 48, 192)   # FramePack K_l per level (dense: per packing group k)
    framepack_mirrored: tuple = (3, 12, 48, 192)  # mirrored FramePack D_l (the paper is silent; ours: = K)
    fullres_frames: int = 14                      # full-resolution rollout n: 7 + 7 frames, 3584 tokens
    upscale_frames: int = 2                       # rollout + upscale base frames B (the paper is silent)
    sampling_steps: int = 50                      # DDIM steps per rollout step (App. A.2); evaluate.py's default

    def __post_init__(self):
        if self.strategy not in STRATEGIES or self.sampling_steps < 1:
            raise ValueError(f"RolloutConfig: strategy = {self.strategy!r}, sampling_steps = {self.sampling_steps}: "
                             f"expected one of {', '.join(STRATEGIES)}, sampling_steps >= 1")

    @property
    def dense(self):
        """The dense FramePack baseline: level-0 tokens only, older context packed (diffusion.DiTConfig.dense)."""
        return self.strategy == "framepack"

    @classmethod
    def from_checkpoint(cls, path):
        """The strategy a video model was trained for, from its checkpoint file (or run folder) alone."""
        return cls(**tokenizer.read_checkpoint(path, "video")["config"]["rollout"])


W_TOY, W_TINY = (1, 4, 16, 64), (1, 4, 16)
PRESETS = {"paper": {},
           # toy: T_0 = 64, 320 tokens per step for each of MilliVid, dense FramePack, full-res (5 frames)
           "toy": dict(frames_per_level=W_TOY, extra_budget=64, framepack_denoised=1, framepack_context=W_TOY,
                       framepack_mirrored=W_TOY, fullres_frames=5),
           # tiny: T_0 = 16, 64 tokens per step, 20 sampling steps (CPU); spin (the memory probe on a CPU): the same
           "tiny": dict(frames_per_level=W_TINY, extra_budget=16, framepack_denoised=1, framepack_context=W_TINY,
                        framepack_mirrored=W_TINY, fullres_frames=4, sampling_steps=20)}
PRESETS["spin"] = PRESETS["tiny"]


def rollout_config(preset="paper", **overrides) -> RolloutConfig:
    """The named preset's RolloutConfig with strict `overrides` (data.make_config)."""
    return data.make_config(RolloutConfig, PRESETS, preset, overrides)


def preset_frames(preset):
    """(T_0, start, end) of a preset: its autoencoder's level-0 tokens per frame, its videos' generated frames."""
    ae, video = tokenizer.ae_config(preset), data.maze_config(preset)
    return (ae.image_size // ae.patch_size) ** 2, video.context, video.frames


@dataclass
class Step:
    selection: np.ndarray  # (L, N) int64: UNSEEN / CONTEXT / DENOISED per (level, chunk-local frame)
    group: int | None      # MilliVid / upscale: the target level; one-step strategies: None


def _positive(name, values, minimum=1):
    values = [int(v) for v in values]
    if not values or min(values) < minimum:
        raise ValueError(f"{name}: expected a non-empty list of integers >= {minimum}, got {values}")
    return values


def _level_tokens(tokens_per_frame, num_levels):
    # T_l = T_0 / 4^l: each level halves the grid's height and width (§3.1)
    if tokens_per_frame < 1 or tokens_per_frame % 4 ** (num_levels - 1):
        raise ValueError(f"tokens_per_frame={tokens_per_frame}: expected a positive multiple of "
                         f"4^(levels-1) = {4 ** (num_levels - 1)}")
    return [tokens_per_frame // 4**l for l in range(num_levels)]


def millivid_steps(frames_per_level, extra_budget, tokens_per_frame):
    """MilliVid's coarse-to-fine rollout of one chunk (§3.2, Fig. 2, Fig. 10): 1 + 4 + 16 + ... steps.

    Level l shows W_l frames in every step (W_l T_l tokens: the same for every level when W_(l+1) = 4 W_l),
    plus E_l = extra_budget / T_l context frames when it is the step's target. The chunk holds
    N = sum(W) + E_(L-1) frames; the last W_(L-1) are new. Worked example (the tests' fixture): W = (1, 4, 16),
    extra budget 256 at T_0 = 256, so T = (256, 64, 16), E = (1, 4, 16), N = 37, new frames 21-36; coarsest
    level on top, `.` unseen, C context, D denoised:

        step 0, target level 2                    step 1, target level 1
    L2  CCCCCCCCCCCCCCCC.....DDDDDDDDDDDDDDDD      .....................CCCCCCCCCCCCCCCC
    L1  ................CCCC.................      ................CCCC.DDDD............
    L0  ....................C................      ....................C................
        step 2, target level 0                    step 20, target level 0
    L2  ................CCCC.....CCCCCCCCCCCC      ................CCCCCCCCCCCCCCCC.....
    L1  .....................CCCC............      ................................CCC.C
    L0  ....................CD...............      ...................................CD

    Step 0 rolls level 2 sixteen frames ahead (21-36: the "plan") from its own past (0-15, its E_2 extra
    frames) and the finer present (level 1: 16-19, level 0: 20). Step 1 makes level 1's first window (21-24)
    with the plan in context at its true place. Step 2 makes level-0 frame 21: level 1 shows the future
    21-24, level 2 the rest of its plan (25-36) plus, as four of its sixteen frames are shown finer, four
    past frames (16-19). Steps 2-5 make frames 21-24, step 6 moves level 1 on (depth first, Fig. 10)...
    """
    W = _positive("frames_per_level", frames_per_level)
    L = len(W)
    if any(W[l + 1] % W[l] for l in range(L - 1)) or extra_budget < 0:
        raise ValueError(f"frames_per_level={W}, extra_budget={extra_budget}: each W_(l+1) must be a "
                         "multiple of W_l (the paper uses 4x) and the extra budget >= 0")
    T = _level_tokens(tokens_per_frame, L)
    E = [extra_budget // T[l] for l in range(L)]  # extra same-level context frames of a target level
    N = sum(W) + E[-1]  # the coarsest target's extra context reaches furthest back: it sets the chunk
    # pos[l]: where level l's current window of W_l frames starts. They begin one window before the new
    # region [N - W_(L-1), N), so the first visit of each level moves it onto the region's first frames.
    pos = [N - W[-1] - W[l] for l in range(L)]

    def selection(target):  # the grid of the step that denoises level `target`'s current window (pos[target])
        sel = np.zeros((L, N), np.int64)
        # the visible span [left, right) is grown outwards from the present, finest level first: each
        # level's W_l frames sit just outside what finer levels already show, so no frame appears at two
        # levels in one step (except the plan: coarse future frames keep their true place)
        left = right = pos[0]
        for l in range(L):  # fine (0) to coarse (L-1)
            if l == target:  # its window is generated; the E_T frames just before the span are context
                sel[l, pos[l]:pos[l] + W[l]] = DENOISED
                left -= E[l]
                sel[l, left:left + E[l]] = CONTEXT
                continue
            lo, hi = pos[l], pos[l] + W[l]  # its nominal window, split by the visible span:
            a = max(0, min(hi, left) - lo)   # frames before the span
            c = max(0, hi - max(lo, right))  # frames at/after its end: the future keeps its true place
            b = W[l] - a - c                 # frames already shown finer: this quota moves into the past
            sel[l, left - a - b:left] = CONTEXT
            sel[l, right:right + c] = CONTEXT
            left, right = left - a - b, right + c
        if left < 0 or right > N:
            raise ValueError(f"frames_per_level={W}: a step reaches outside its chunk of {N} frames")
        return sel

    def visit(l):  # depth first: parent before children, children left to right (Fig. 10)
        pos[l] += W[l]  # this level's next window: W_l frames further on
        steps.append(Step(selection(l), group=l))
        for _ in range(W[l] // W[l - 1] if l > 0 else 0):  # the finer level fills the window just made
            visit(l - 1)

    steps = []
    visit(L - 1)
    return steps


def fullres_steps(num_frames):
    """Full-resolution autoregressive rollout (§4 Models, Fig. 11): one level, one step, the first n // 2
    frames context, the rest denoised (paper: n = 14, 7 + 7 frames, 3584 tokens)."""
    n = _positive("num_frames", [num_frames], minimum=2)[0]
    return framepack_steps(n - n // 2, [n // 2])  # that is one-level FramePack with K_0 = n // 2


def framepack_steps(num_denoised, context_frames_per_level):
    """FramePack (§4 Models, §5 Q3, Fig. 11): one step, K_l context frames at level l, the final d frames denoised
    at every level (on hierarchical latents they later serve as coarse context). The dense paper baseline reads it
    through step_layout(dense=True), so its d new frames are full resolution."""
    K = _positive("context_frames_per_level", context_frames_per_level, minimum=0)
    d = _positive("num_denoised", [num_denoised])[0]
    return framepack_mirrored_steps([d] + [0] * (len(K) - 1), K)  # the mirrored one with D = (d, 0, ..., 0)


def framepack_mirrored_steps(denoised_frames_per_level, context_frames_per_level):
    """Mirrored FramePack (§5 Q3, Fig. 11): the targets mirror the context. The first D_0 future frames
    are denoised at every level, the next D_1 at level 1 only, and so on. Only the first D_0 are kept:
    pass num_clipped = sum(D) - D_0 to `chunk_starts`; later chunks regenerate the rest (later writes win)."""
    K = _positive("context_frames_per_level", context_frames_per_level, minimum=0)
    D = _positive("denoised_frames_per_level", denoised_frames_per_level, minimum=0)
    if len(D) != len(K) or D[0] < 1:
        raise ValueError(f"denoised_frames_per_level={D}: expected one value per level of "
                         f"context_frames_per_level={K}, with D_0 >= 1")
    sel, f = np.zeros((len(K), sum(K) + sum(D)), np.int64), 0
    for l in reversed(range(len(K))):  # context runs oldest -> newest from coarsest to finest level (Fig. 11)
        sel[l, f:f + K[l]] = CONTEXT
        f += K[l]
    sel[:, f:f + D[0]] = DENOISED
    for l in range(1, len(D)):
        f += D[l - 1]
        sel[l, f:f + D[l]] = DENOISED
    return [Step(sel, None)]


def rollout_upscale_steps(base_frames, num_levels):
    """Rollout + upscale (§3.2 inset, Fig. 11 left): the coarsest level rolls out alone, each finer level
    rolls out from its recent past plus the next-coarser level. Widths w_l = B 4^l, the top's 9/8 of that,
    so every step has 9/8 B T_0 tokens (w_l T_l + w_l/2 T_(l+1) = B T_0 + B T_0 / 8)."""
    B, L = int(base_frames), int(num_levels)
    if L < 2 or B < 2 or B % 2 or (B * 4 ** (L - 1)) % 16:
        raise ValueError(f"base_frames={B}, num_levels={L}: expected >= 2 levels and an even B with "
                         "B * 4^(levels-1) divisible by 16 (so the top width, 9/8 of it, is even)")
    w = [B * 4**l for l in range(L - 1)] + [B * 4 ** (L - 1) * 9 // 8]
    N = w[-1] * 3 // 2  # the top steps twice; every level denoises the same new frames [w_top / 2, N)
    steps = []
    for l in reversed(range(L)):  # coarse to fine, each level's window of w_l frames moving on by half of it
        half = w[l] // 2
        for s in range((w[-1] - w[l]) // 2, N - w[l] + 1, half):
            sel = np.zeros((L, N), np.int64)
            sel[l, s:s + half] = CONTEXT
            sel[l, s + half:s + w[l]] = DENOISED
            if l < L - 1:
                sel[l + 1, s + half:s + w[l]] = CONTEXT  # the coarse version of the frames it upscales
            steps.append(Step(sel, l))
    return steps


def step_probabilities(steps):
    """Training distribution (§3.2): each group 1 / num_groups, split evenly: p = 1 / (num_groups * group size)."""
    groups = [s.group for s in steps]
    return np.array([1.0 / (len(set(groups)) * groups.count(s.group)) for s in steps])


def first_denoised(steps):
    """D0: the first chunk-local frame that any step denoises."""
    return min(int(np.flatnonzero((s.selection == DENOISED).any(0))[0]) for s in steps)


def chunk_starts(steps, start, end, num_clipped=0):
    """Chunk sliding: the global first frames of the chunks that generate frames [start, end). A chunk of N frames
    finishes w = N - D0 - num_clipped frames, so chunk k starts at start - D0 + k w; its first D0 frames (ground truth
    or earlier chunks' output) are its past. The last may overshoot `end`: buffers need chunk_starts[-1] + N frames."""
    N, D0 = steps[0].selection.shape[1], first_denoised(steps)
    w = N - D0 - num_clipped
    if w < 1 or num_clipped < 0:
        raise ValueError(f"num_clipped={num_clipped}: leaves {w} finished frames of a {N}-frame chunk with D0={D0}")
    if start < D0 or end <= start:
        raise ValueError(f"start={start}, end={end}: expected D0={D0} <= start < end "
                         "(the first chunk's context is ground truth)")
    return [start - D0 + k * w for k in range(math.ceil((end - start) / w))]


def _cells(selection, dense):
    seen = selection != UNSEEN
    # dense FramePack: a frame enters once, in the group of its finest non-UNSEEN level
    return seen & (np.cumsum(seen, axis=0) == 1) if dense else seen


def level_tokens(selection, tokens_per_frame, dense=False):
    """Tokens each level (dense: each packing group k, T_0 / 4^k per frame) adds to a step: (L,)."""
    return _cells(selection, dense).sum(1) * np.array(_level_tokens(tokens_per_frame, len(selection)))


def step_layout(selection, grids, dense=False):
    """A step's tokens as int64 arrays (T,) frame, level, row, col, role: level-major, then frame ascending, then
    row-major in the grid (the order of the autoencoder's tokens and the latent store). dense=True: each frame's
    finest cell becomes raw level-0 tokens (grids[0]) with level = its group k; the dense model packs them itself."""
    L = len(selection)
    if len(grids) < L:
        raise ValueError(f"grids: expected at least {L} (h, w) pairs for a {L}-level selection, got {grids}")
    cells, parts = _cells(selection, dense), []
    for l in range(L):
        (h, w), f = grids[0] if dense else grids[l], np.flatnonzero(cells[l])
        # every (frame, row, col) of the level's cells, frame-major, then row-major: 3 x (F_l·h·w,)
        frame, row, col = (a.ravel() for a in np.meshgrid(f, np.arange(h), np.arange(w), indexing="ij"))
        parts.append(np.stack([frame, np.full_like(frame, l), row, col, selection[l, frame]]))  # (5, F_l·h·w)
    frame, level, row, col, role = np.concatenate(parts, 1).astype(np.int64)  # (5, T)
    return dict(frame=frame, level=level, row=row, col=col, role=role)


def knowledge(steps, start, end, faces, num_clipped=0):
    """What a strategy's model can know of each generated frame (evaluate.py's memory probe), following what its steps
    read. faces[f]: frame f's wall faces. A ground-truth cell (frame < start) knows its frame's faces; a cell a step
    denoises knows those of its frame's faces that a cell the step reads (CONTEXT) knows. Per frame [start, end):
    `known`, what its final level-0 cell can know; `reach`, how far back (frames) the steps writing it read."""
    known, reach = {(l, f): set(faces[f]) for l in range(len(steps[0].selection)) for f in range(start)}, {}
    for s in chunk_starts(steps, start, end, num_clipped):
        for step in steps:
            context = [(int(l), s + int(f)) for l, f in np.argwhere(step.selection == CONTEXT)]
            seen = set().union(*(known.get(cell, ()) for cell in context))
            for l, f in np.argwhere(step.selection == DENOISED):  # later writes win, as in `generate`
                t = s + int(f)
                known[int(l), t] = (set(faces[t]) if t < end else set()) & seen
                reach[t] = max(reach.get(t, 0), t - min(f for _, f in context))
    return dict(known=[known[0, t] for t in range(start, end)], reach=[reach[t] for t in range(start, end)])


# ----------------------------------------------------------------------------------------------------
# Showing a strategy: derived figures, App. A.3's cost table, text grids (the worked example's notation), pictures

def figures(steps, tokens_per_frame, start, end, num_clipped=0, dense=False, sampling_steps=50):
    """Chunk frames N, first denoised frame D0, finished frames per chunk, tokens per step (and per level,
    (steps, L)), and the cost of generating [start, end): network evaluations = rollout x sampling steps (App. A.3)."""
    per_level = np.stack([level_tokens(s.selection, tokens_per_frame, dense) for s in steps])
    starts = chunk_starts(steps, start, end, num_clipped)
    N, D0, rollout_steps = len(steps[0].selection[0]), first_denoised(steps), len(starts) * len(steps)
    return dict(chunk_frames=N, first_denoised=D0, new_frames=N - D0 - num_clipped, steps_per_chunk=len(steps),
                tokens=int(per_level.sum(1).max()), equal_tokens=len(set(per_level.sum(1))) == 1,
                level_tokens=per_level, chunk_starts=starts, buffer_end=starts[-1] + N,
                rollout_steps=rollout_steps, nfe=rollout_steps * sampling_steps)


def strategy_steps(cfg, tokens_per_frame):
    """(steps, num_clipped) of the strategy a RolloutConfig names: one if/elif, one step function each."""
    if cfg.strategy == "millivid":
        return millivid_steps(cfg.frames_per_level, cfg.extra_budget, tokens_per_frame), 0
    if cfg.strategy in ("framepack", "framepack_hier"):  # dense paper baseline / hierarchical: one selection
        return framepack_steps(cfg.framepack_denoised, cfg.framepack_context), 0
    if cfg.strategy == "framepack_mirrored":  # only the first D_0 frames are kept (§5 Q3)
        D = cfg.framepack_mirrored
        return framepack_mirrored_steps(D, cfg.framepack_context), sum(D) - D[0]
    if cfg.strategy == "fullres":
        return fullres_steps(cfg.fullres_frames), 0
    if cfg.strategy == "upscale":
        return rollout_upscale_steps(cfg.upscale_frames, len(cfg.frames_per_level)), 0  # levels: as MilliVid's
    raise ValueError(f"strategy={cfg.strategy!r}: expected one of {', '.join(STRATEGIES)}")


def cost_table(cfg, tokens_per_frame, start, end, sampling_steps=50):
    """App. A.3 at equal budget: MilliVid, FramePack (dense, the paper's baseline), full resolution."""
    row = "{:<11}{:>7}{:>8}{:>5}{:>10}{:>12}{:>7}{:>14}{:>8}".format
    lines = [f"cost of generating frames [{start}, {end}) = {end - start} frames, {sampling_steps} sampling steps "
             "per rollout step (App. A.3)",
             row("strategy", "tokens", "chunk N", "D0", "new/chunk", "steps/chunk", "chunks", "rollout steps", "NFE")]
    fig = {}
    for name in ("millivid", "framepack", "fullres"):
        steps, clipped = strategy_steps(replace(cfg, strategy=name), tokens_per_frame)
        f = fig[name] = figures(steps, tokens_per_frame, start, end, clipped, name == "framepack", sampling_steps)
        lines.append(row(name, f["tokens"], f["chunk_frames"], f["first_denoised"], f["new_frames"],
                         f["steps_per_chunk"], len(f["chunk_starts"]), f["rollout_steps"], f["nfe"]))
    m, p = fig["millivid"], fig["framepack"]
    total = Fraction(m["rollout_steps"], p["rollout_steps"])
    # per generated frame: (1 + 4 + 16 + 64) / 64 = 85/64 for 4 levels, "about 33% more" (App. A.3)
    per_frame = Fraction(m["steps_per_chunk"] * p["new_frames"], m["new_frames"] * p["steps_per_chunk"])
    lines.append(f"MilliVid / FramePack rollout steps: {m['rollout_steps']}/{p['rollout_steps']} = {total} = "
                 f"{float(total):.3f} (per generated frame: {per_frame}; paper: \"about 33% more\")")
    return "\n".join(lines) + "\n"

def format_steps(steps, tokens_per_frame, dense=False):
    """Text grids: one row per level, coarsest on top; `.` UNSEEN, `C` CONTEXT, `D` DENOISED."""
    L, N = steps[0].selection.shape
    out = [f"chunk frames {N} steps {len(steps)}"]
    for i, s in enumerate(steps):
        out.append(f"step {i}" + ("" if s.group is None else f" target level {s.group}"))
        out += [f"  L{l} " + "".join(SYMBOLS[v] for v in s.selection[l]) for l in reversed(range(L))]
        out.append(f"  tokens {level_tokens(s.selection, tokens_per_frame, dense).sum()}")
    return "\n".join(out) + "\n"


def save_picture(steps, tokens_per_frame, path, dense=False):
    """One PNG sheet of a panel per step (Fig. 10): a row per level (coarsest on top, as in the text grids; the
    paper draws the finest on top), a column per frame, a colour per state; step, group, tokens; a legend."""
    # Fig. 10's states: UNSEEN cells are "fixed" (already generated) or "pending" (not yet generated)
    colours = dict(pending=(236, 236, 236), fixed=(150, 150, 150), context=(66, 126, 220), denoised=(236, 118, 36))
    L, N = steps[0].selection.shape
    cw, ch, x0, y0 = max(2, min(16, 960 // N)), 14, 26, 18  # cell width and height, the grid's corner in a panel
    w, h = max(x0 + N * cw + 4, 360), y0 + L * ch + 6  # a panel
    cols = max(1, min(len(steps), 1600 // w))
    sheet = Image.new("RGB", (cols * w, 18 + math.ceil(len(steps) / cols) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, colour) in enumerate(colours.items()):  # the legend on top
        draw.rectangle([4 + 90 * k, 4, 14 + 90 * k, 14], fill=colour)
        draw.text((18 + 90 * k, 3), name, fill="black")
    produced = np.tile(np.arange(N) < first_denoised(steps), (L, 1))  # the chunk's past: truth or earlier chunks
    for i, s in enumerate(steps):
        px, py = (i % cols) * w, 18 + (i // cols) * h  # the panel's corner
        group = "" if s.group is None else f"   target level {s.group}"
        tokens = level_tokens(s.selection, tokens_per_frame, dense).sum()
        draw.text((px + 4, py + 3), f"step {i}{group}   tokens {tokens}", fill="black")
        for row, l in enumerate(reversed(range(L))):
            y = py + y0 + row * ch
            draw.text((px + 4, y), f"L{l}", fill="black")
            for x, v, done in zip(range(px + x0, px + x0 + N * cw, cw), s.selection[l], produced[l]):  # per frame
                state = ("fixed" if done else "pending", "context", "denoised")[v]
                draw.rectangle([x, y, x + cw - 1 - (cw > 3), y + ch - 3], fill=colours[state])
        produced |= s.selection == DENOISED
    data.atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, epilog="Any RolloutConfig setting overrides the preset "
                                     "as --key=value, e.g. --frames_per_level=1,4,16 --extra_budget=256.",
                                     description="Print, draw, cost or benchmark the rollout strategies.")
    arg = parser.add_argument
    arg("command", choices=("show", "cost", "bench"))
    arg("strategy", nargs="?", default="millivid", help="for show",
        choices=("millivid", "framepack", "framepack-mirrored", "fullres", "upscale"))
    arg("--preset", choices=sorted(PRESETS), help="default: paper (bench on a CPU: tiny)")
    arg("--tokens", type=int, help="T_0, level-0 tokens per frame (default: the preset autoencoder's)")
    arg("--start", type=int, help="first generated frame (default: the preset's context)")
    arg("--end", type=int, help="frames of the video (default: the preset's)")
    arg("--dense", action="store_true", help="FramePack: count tokens as the dense paper baseline does")
    arg("--figures", action="store_true", help="show: print the derived figures after the grids")
    arg("--image", help="show: write every step into one PNG (Fig. 10)")
    arg("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bench: cpu | cuda")
    arg("--batch", type=int, help="bench: default 48 on CUDA (the paper's), on CPU 16 / 4 / 1")
    arg("--iters", type=int, default=5, help="bench: timed steps per round")
    arg("--compile", action="store_true", help="bench: torch.compile'd beside eager")
    arg("--checkpointing", action="store_true", help="bench: activation checkpointing per block")
    arg("--store", help="bench: instead, training reads of this latent store (MilliVid steps): items/s, bytes")
    arg("--workers", type=int, default=0, help="bench --store: DataLoader worker processes")
    args, rest = parser.parse_known_args(argv)
    if args.image and not os.path.isdir(os.path.dirname(os.path.abspath(args.image))):  # checked before any work
        raise SystemExit(f"{args.image}: folder {os.path.dirname(os.path.abspath(args.image))} does not exist")
    if args.command == "bench" and args.store:
        return read_bench(args.store, args.workers)
    if args.command == "bench":
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("bench: --device cuda but CUDA is not available here (use --device cpu)")
        preset = args.preset or ("tiny" if args.device == "cpu" else "paper")
        batch = args.batch or (48 if args.device == "cuda" else {"toy": 4, "paper": 1}.get(preset, 16))
        (T0, start, end), cfg = preset_frames(preset), rollout_config(preset)
        steps, g0 = strategy_steps(cfg, T0)[0], math.isqrt(T0)  # MilliVid's; the last has a level-0 target
        layout = step_tokens(steps[-1], [(g0 >> l, g0 >> l) for l in range(len(cfg.frames_per_level))], 1)
        per_step = figures(steps, T0, start, end)["new_frames"] / len(steps)  # new frames per rollout step: frames/s
        return diffusion.bench(diffusion.dit_config(preset), layout, args.device, batch, args.iters,
                               compile=args.compile, checkpointing=args.checkpointing, frames_per_step=per_step,
                               sampling_steps=cfg.sampling_steps)
    preset = args.preset or "paper"  # T_0 and [start, end): the preset's unless given
    T0, start, end = (a or b for a, b in zip((args.tokens, args.start, args.end), preset_frames(preset)))
    try:
        cfg = rollout_config(preset, **data.parse_overrides(rest), strategy=args.strategy.replace("-", "_"))
        if args.command == "cost":
            return print(cost_table(cfg, T0, start, end, cfg.sampling_steps), end="")
        steps, clipped = strategy_steps(cfg, T0)
        print(format_steps(steps, T0, args.dense), end="")
        if args.figures:
            f = figures(steps, T0, start, end, clipped, args.dense, cfg.sampling_steps)
            print(f"chunk frames {f['chunk_frames']}, first denoised frame D0 {f['first_denoised']}, new frames per "
                  f"chunk {f['new_frames']}, tokens per step {f['tokens']} "
                  + ("(every step)" if f["equal_tokens"] else "(at most)"))
            for counts, g in dict.fromkeys((tuple(n), s.group) for n, s in zip(f["level_tokens"], steps)):  # distinct
                print(f"  {'step' if g is None else f'target level {g}'}: "
                      + "  ".join(f"L{l} {n}" for l, n in enumerate(counts)))
            c = f["chunk_starts"]
            c = ", ".join(map(str, c[:4])) + (f", ..., {c[-1]}" if len(c) > 4 else "") + f" ({len(c)} chunks)"
            print(f"frames [{start}, {end}): chunks at {c} -> {f['rollout_steps']} rollout steps, {f['nfe']} network "
                  "evaluations")
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    if args.image:
        save_picture(steps, T0, args.image, args.dense)


# ----------------------------------------------------------------------------------------------------
# Training data (§3.2, Training Procedure): chunks of N frames, a randomly drawn step per chunk

def locate(ends, i):
    """Item i -> (video, item within it), given ends = [0, cumulative item counts of the videos]."""
    if not 0 <= i < ends[-1]:
        raise IndexError(f"item {i} outside the dataset of {ends[-1]} items")
    v = int(np.searchsorted(ends, i, side="right")) - 1
    return v, i - int(ends[v])


class ChunkDataset(torch.utils.data.Dataset):
    """Every (video, start) with start in [0, frames - chunk_frames] of a latent store. An item is (i, s): chunk
    i read for rollout step s (the sampler draws it), and only the cells that step uses are read, memory-mapped,
    in the stored float16: per item T·C·2 bytes (paper: 3,840 x 32 x 2 = 246 KB, not the whole chunk's 9.7 MB)."""
    def __init__(self, root, keys, chunk_frames, steps, grids, dense=False):
        self.root, self.keys, self.N = root, list(keys), chunk_frames
        index = data.load_index(root)                    # {key: frames}: no file opened per video (200k of them)
        self.ends = np.cumsum([0] + [max(0, index[k] - chunk_frames + 1) for k in self.keys])
        self.reads = []  # per step, on the host once: per level the chunk frames it reads; each token's place in them
        for step in steps:
            layout = step_layout(step.selection, grids, dense)
            if dense:  # raw level-0 tokens of every frame shown; the layout groups them by k, the read is frame order
                (h, w), frames = grids[0], [np.unique(layout["frame"])]
                where = (np.searchsorted(frames[0], layout["frame"]) * h + layout["row"]) * w + layout["col"]
            else:  # the layout's order is the store's (level-major, frame ascending, row-major): read as it is
                frames, where = [np.flatnonzero(c) for c in step.selection != UNSEEN], np.arange(len(layout["frame"]))
            self.reads.append((frames, where, layout["frame"]))

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, item):
        (i, s), (frames, where, token_frame) = item, self.reads[item[1]]
        v, start = locate(self.ends, i)
        path = os.path.join(self.root, self.keys[v])
        rows = [np.load(f"{path}/l{l}.npy", mmap_mode="r")[start + f] for l, f in enumerate(frames)]  # (F_l, T_l, C)
        x = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])[where]    # (T, C) float16
        act = np.load(f"{path}/actions.npy", mmap_mode="r")[start:start + self.N, 0][token_frame]  # (T,)
        return dict(x=torch.from_numpy(x), action=torch.from_numpy(act.astype(np.int64)), step=s)

    def item_name(self, i):
        v, start = locate(self.ends, i)
        return f"{self.keys[v]} frames {start}-{start + self.N - 1}"


def training_batch(batch, gathers, device):
    """A collated batch of ChunkDataset items (each the tokens of its drawn rollout step) -> the model's inputs on
    `device`: the step layouts stacked (steps of one strategy have equal token counts), x to float32 there."""
    fields = {k: torch.stack([gathers[s][k] for s in batch["step"].tolist()]) for k in gathers[0]}  # (B, T)
    out = dict(x=batch["x"].to(device, non_blocking=True).float(), action=batch["action"].to(device, non_blocking=True))
    return out | {k: fields[k].to(device, non_blocking=True) for k in ("denoised", "frame", "level", "row", "col")}


def read_bench(store, workers=0, seconds=10.0, batch=48):
    """Items/s and bytes per item of training reads from a latent store (MilliVid's steps, random chunks and steps)."""
    grids = [tuple(g) for g in json.load(open(f"{store}/meta.json"))["grids"]]
    W = RolloutConfig().frames_per_level[:len(grids)]  # the paper's widths, cut to the store's levels
    steps = millivid_steps(W, grids[-1][0] * grids[-1][1] * W[-1], grids[0][0] * grids[0][1])
    ds = ChunkDataset(store, sorted(data.load_index(store)), steps[0].selection.shape[1], steps, grids)
    rng = np.random.default_rng(0)
    batches = iter(lambda: list(zip(rng.integers(len(ds), size=batch).tolist(),
                                    rng.integers(len(steps), size=batch).tolist())), None)  # endless
    it = iter(torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers))
    x, count, start = next(it)["x"], 0, time.perf_counter()  # after a warm-up batch (workers started)
    while time.perf_counter() - start < seconds:
        x = next(it)["x"]
        count += len(x)
    rate = count / (time.perf_counter() - start)
    print(f"reads of {store}: {rate:,.0f} items/s with {workers} workers, {x[0].numel() * 2:,} bytes per item "
          f"({len(x[0])} tokens x {x.shape[-1]} channels, float16): {rate * x[0].numel() * 2 / 1e6:,.1f} MB/s")


# ----------------------------------------------------------------------------------------------------
# Generation: the chunked rollout of a batch of videos (§3.2, App. A.2 "Inference Details")

def step_tokens(step, grids, num_frames, dense=False):
    """A step's tokens as (T,) tensors, for training and generation alike: its layout, the `denoised` mask, and
    where each token lives in latents of `num_frames` frames flattened level-major ([level 0: frame-major, row-major
    tokens], [level 1: ...], ...): a chunk from frame s reads `index + s * per_frame`. Dense FramePack: level 0 only."""
    layout = step_layout(step.selection, grids, dense)
    level = np.zeros_like(layout["level"]) if dense else layout["level"]  # dense: raw level-0 tokens
    tokens, width = np.array([h * w for h, w in grids]), np.array([w for _, w in grids])  # T_l, w_l
    offset = np.concatenate([[0], np.cumsum(tokens * num_frames)])  # where each level's block starts
    index = offset[level] + layout["frame"] * tokens[level] + layout["row"] * width[level] + layout["col"]
    out = {**layout, "denoised": layout["role"] == DENOISED, "index": index, "per_frame": tokens[level]}
    return {k: torch.from_numpy(v) for k, v in out.items()}


def dense_packing(step, grids):
    """((h, w), frames per packing group k) of a dense FramePack step: VideoDiT.pack's shapes, known on the host."""
    h, w = grids[0]
    return (h, w), tuple(int(n) for n in _cells(step.selection, dense=True).sum(1))  # frames per group k


def generate(model, steps, latents, actions, start, end, grids, *, dense=False, num_clipped=0,
             sampling_steps=50, cfg_scale=1.0, generator=None):
    """Roll a batch of videos out from ground-truth context, in lockstep (§3.2, App. A.2). latents: per level
    (B, F, T_l, C), only frames < start read; actions: (B, F) long. Returns per level (B, F', T_l, C), F' >= end:
    [start, end) generated, then an overshooting last chunk's padding. All steps read from and write to one buffer."""
    num_levels = 1 if dense else len(steps[0].selection)
    starts = chunk_starts(steps, start, end, num_clipped)
    frames = starts[-1] + steps[0].selection.shape[1]  # the buffer holds the overshooting last chunk too
    B, device = actions.shape[0], actions.device
    with torch.no_grad():
        # the buffer: ground-truth context, zeros where nothing has been generated yet
        buffer = torch.cat([torch.cat([z[:, :start], z.new_zeros(B, frames - start, *z.shape[2:])], 1)
                            .flatten(1, 2) for z in latents[:num_levels]], 1)  # (B, sum_l F'·T_l, C)
        # past the video's end the last action simply continues (those frames are padding)
        actions = torch.cat([actions[:, :frames], actions[:, -1:].expand(B, max(0, frames - actions.shape[1]))], 1)
        # per step, once, on the host: its tokens, where they live, which positions it generates ("new")
        plans = [step_tokens(step, grids, frames, dense) for step in steps]
        plans = [{k: v.to(device) for k, v in p.items()} | {"new": p["denoised"].nonzero()[:, 0].to(device),
                 "packing": dense_packing(step, grids) if dense else None} for p, step in zip(plans, steps)]
        for s in starts:
            for p in plans:
                where = p["index"] + s * p["per_frame"]  # (T,) this step's tokens in the buffer
                frame = p["frame"] + s                   # global frame index; the model makes frames relative
                x = diffusion.ddim_sample(model, buffer[:, where], p["denoised"], frame, p["level"], p["row"], p["col"],
                                          actions[:, frame], steps=sampling_steps, cfg_scale=cfg_scale,
                                          generator=generator, packing=p["packing"])
                buffer[:, where[p["new"]]] = x[:, p["new"]].to(buffer.dtype)  # write back by (frame, level, row, col)
        sizes = [frames * h * w for h, w in grids[:num_levels]]
        return [z.unflatten(1, (frames, -1)) for z in buffer.split(sizes, 1)]  # per level (B, F', T_l, C)


if __name__ == "__main__":
    main()
