"""Data (paper §4 "Datasets", App. A.1) and the one strict --key=value settings mechanism of every config.

Loopcraft (§4): 1024-frame Minecraft videos of an agent running forward with random 90° turns, biased to pairs and
quartets so it keeps coming back; its test set (App. A.1) keeps action sequences whose late path revisits the context.
Here: the frame store every stage reads (per video: packed PNGs, (frames, 6) poses); `prepare` (Loopcraft -> it); the
maze (Loopcraft's walk and test selection, memory-probe walks, in a ray-cast grid world); maps, videos, atomic writes.

Poses, the maze's as Loopcraft's, are MineRL's [action, x, y, z, yaw, pitch]: action 0 forward, 1 left, 2 right; y up,
the ground (x, z); yaw in degrees, 0 facing +z, facing (-sin yaw, cos yaw), a right turn adding 10°. In the maze x is
the row and z the column of the grid, in cells ((column, row) would mirror the views), y the eye height, pitch 0.

    python data.py maze --out data/maze --preset toy [--split test] [--videos=N --frames=F --key=value ...]
    python data.py prepare LOOPCRAFT_SPLIT data/loopcraft
    python data.py show data/maze 000/000 --out video.gif
    python data.py bench
"""
import argparse
import contextlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm


@dataclass
class MazeConfig:
    """Defaults mirror Loopcraft (§4, App. A.1); presets `toy` and `tiny` shrink it."""
    size: int = 256            # image side in pixels
    frames: int = 1024         # frames per video
    context: int = 256         # frames shown to the model; the test split is chosen around this split point
    videos: int = 200_000      # training videos
    test_videos: int = 1000    # loop-biased test videos
    world: int = 48            # world side in cells (walks of 1024 frames stay ~20 cells from the start)
    density: float = 0.07      # fraction of interior cells that are walls: low, so bumps stay rare
    candidates: int = 100      # action sequences drawn per test video (App. A.1)
    lowest: int = 10           # ... one picked uniformly among this many lowest-Chamfer ones
    pool: int = 10             # test videos are the farthest-travelled 1/pool of pool·test_videos (10,000 -> 1,000)
    fov: float = 70.0          # horizontal = vertical field of view, degrees (Minecraft's default 70)
    walk: str = "loopcraft"    # loopcraft | spin (one turn direction held: 360° = 36 frames) | revisit (memory probe)
    leg: int = 8               # revisit: `leg` cells out, turn back, return, turn: views recur every 18·leg + 36 frames
    seed: int = 0                 # worlds and walks are a pure function of (seed, split, video)
    workers: int = os.cpu_count() or 1   # generation processes (the bytes do not depend on it)

    def __post_init__(self):
        if self.walk not in ("loopcraft", "spin", "revisit") or self.leg < 1:
            raise ValueError(f"MazeConfig: walk={self.walk!r}, leg={self.leg}: expected loopcraft|spin|revisit, leg>=1")


# The evaluated split of a video, [context, frames), is stated here only: evaluate.py and rollout.py read it.
PRESETS = {"paper": {},
           "toy": dict(size=64, frames=384, context=128, videos=1000, test_videos=64, world=32),
           "tiny": dict(size=32, frames=96, context=32, videos=32, test_videos=8, world=16),
           # spin: the memory probe on a CPU (evaluate.py): tiny's videos, spinning; every test video is a probe
           "spin": dict(size=32, frames=96, context=32, videos=256, test_videos=32, world=16, walk="spin", pool=1)}


def maze_config(preset: str = "paper", **overrides) -> MazeConfig:
    return make_config(MazeConfig, PRESETS, preset, overrides)


# ------------------------------------------ settings: the one strict --key=value mechanism of every config
def make_config(cls, presets: dict, preset: str, overrides: dict):
    """The dataclass `cls` with presets[preset], then `overrides` (typed, an int passing for a float, or command-line
    text parsed by the field's type). Strict: an unknown preset or key or a wrong type is a ValueError naming it."""
    name, defaults = cls.__name__, {f.name: f.default for f in fields(cls)}
    if preset not in presets:
        raise ValueError(f"{name}: unknown preset {preset!r}; expected one of {', '.join(presets)}")
    typed = {}
    for key, value in overrides.items():
        if key not in defaults:
            raise ValueError(f"{name}: unknown key {key!r}; expected one of {', '.join(defaults)}")
        like = defaults[key]
        if isinstance(value, str) and isinstance(like, bool):
            value = {"true": True, "1": True, "false": False, "0": False}.get(value.lower(), value)
        elif isinstance(value, str) and not isinstance(like, str):
            with contextlib.suppress(ValueError):   # unparsable text stays text, and fails the type check below
                value = tuple(type(like[0] if like else 0)(v) for v in value.split(",") if v) \
                    if isinstance(like, tuple) else type(like)(value)               # "3,12,48" for a tuple
        if not (type(value) is type(like) or (type(like) is float and type(value) is int)):
            kind = "bool (true/false)" if isinstance(like, bool) else type(like).__name__
            raise ValueError(f"{name}: {key}={value!r} should be of type {kind}")
        typed[key] = value
    return cls(**{**presets[preset], **typed})


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """["--lr=3e-4", "--batch-size", "8"] -> {"lr": "3e-4", "batch_size": "8"}; anything else is an error."""
    out, rest = {}, list(argv)
    while rest:
        arg = rest.pop(0)
        key, eq, value = arg[2:].partition("=")
        if not arg.startswith("--") or not (eq or rest):
            raise SystemExit(f"{arg!r}: expected --key=value (or --key value)")
        out[key.replace("-", "_")] = value if eq else rest.pop(0)
    return out


# ------------------------------------------------- actions and the random walk (§4, App. A.1)
FORWARD, LEFT, RIGHT = 0, 1, 2
HOLD, TURN = 9, 10              # every action is held 9 frames; a turn frame adds 10° of yaw: a held turn is 90°
TURN_COUNTS, TURN_P = np.array([1, 2, 3, 4]), [0.1, 0.3, 0.1, 0.5]
# Positions: integer units of 1/18 cell (cell i: [18i, 18i+18)), so a held forward (9 STEPs of 2) is exactly one cell.
UNIT, STEP, RADIUS = 18, 2, 4   # RADIUS: how far ahead of the eye the body reaches (a wall stops it)
EYE, WALL = 0.5, 2.5            # eye height and wall height in cells: tall walls fill the view like trees


def bundle(rng: np.random.Generator) -> list[int]:
    """One Loopcraft bundle, not yet held: k turns (p = [.1, .3, .1, .5]) all in one direction and m ~ U{k .. 3k-1}
    forwards, shuffled, after one extra forward. Mean 1 + 5.5 forwards, 3 turns: 6.5 / 9.5 = 68% of frames forward."""
    k = int(rng.choice(TURN_COUNTS, p=TURN_P))
    m = int(rng.integers(k, 3 * k))
    turns = [int(rng.integers(LEFT, RIGHT + 1))] * k
    return [FORWARD, *rng.permutation(turns + [FORWARD] * m).tolist()]


def random_walk(rng: np.random.Generator, frames: int, n: int = 1) -> np.ndarray:
    """n Loopcraft action sequences (n, frames) int64: bundles back to back, every action held 9 frames."""
    walks = np.empty((n, frames), np.int64)
    for i in range(n):
        actions = []
        while HOLD * len(actions) < frames:
            actions += bundle(rng)
        walks[i] = np.repeat(actions, HOLD)[:frames]
    return walks


# --------------------------------- the maze world: cells 0 = floor, 1..8 = wall type (base colour + texture)
# PALETTE[v]: world value v's base colour, then the ceiling's. Wall hues are far apart and textures and shading only
# scale brightness, so chromaticity tells the wall type (what coarse latent levels keep); fine levels add the pattern.
PALETTE = np.array([[110, 100, 90], [220, 50, 50], [235, 140, 30], [225, 215, 40], [60, 190, 60], [40, 200, 200],
                    [50, 90, 230], [150, 70, 220], [230, 70, 180], [200, 200, 210]], np.uint8)
TEX = 8                                             # texels per wall face side


def make_world(rng: np.random.Generator, n: int, density: float) -> np.ndarray:
    """An (n, n) uint8 world: a border wall in runs of colours (a landmark from anywhere), scattered blocks and
    wall segments of one type each, open space all around: the walk (blind, like Loopcraft's) rarely bumps."""
    w = np.ones((n, n), np.uint8)
    w[1:-1, 1:-1] = 0
    ring = np.argwhere(w)                           # border cells, ordered around the centre below
    ring = ring[np.argsort(np.arctan2(*(ring - (n - 1) / 2).T), kind="stable")]
    w[tuple(ring.T)] = np.repeat(rng.integers(1, 9, len(ring)), rng.integers(2, 6, len(ring)))[:len(ring)]
    for _ in range(round(density * (n - 2) ** 2 / 2.5)):      # structures cover 2.5 cells on average
        if rng.random() < 0.5:                      # block, 1-2 x 1-2
            h, l = rng.integers(1, 3, 2)
        else:                                       # wall segment, 1 x 2-4, either orientation
            h, l = (1, int(rng.integers(2, 5)))[:: 1 if rng.random() < 0.5 else -1]
        i, j = rng.integers(1, n - 1, 2)
        w[i:min(i + h, n - 1), j:min(j + l, n - 1)] = rng.integers(1, 9)
    return w


def start_state(rng: np.random.Generator, world: np.ndarray) -> tuple[int, int, int]:
    """(x, z, yaw), x, z in units: the centre of a random floor cell in the middle half, 4 neighbours free."""
    n, free = len(world), world == 0
    x, z = np.mgrid[:n, :n]                         # x the row, z the column
    ok = free & (abs(x - n / 2) < n / 4) & (abs(z - n / 2) < n / 4)
    ok[1:-1, 1:-1] &= free[:-2, 1:-1] & free[2:, 1:-1] & free[1:-1, :-2] & free[1:-1, 2:]
    cells = np.argwhere(ok)
    if len(cells) == 0:
        raise ValueError("world has no free cell to start in")
    cx, cz = cells[rng.integers(len(cells))]
    return int(cx) * UNIT + UNIT // 2, int(cz) * UNIT + UNIT // 2, -90 * int(rng.integers(4)) % 360


def simulate(world: np.ndarray, actions: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
    """Poses (n, frames, 6) float32 of action sequences (n, frames) from `start` (x, z in units, yaw); frame t is seen
    after action t. A forward frame moves 1/9 cell along (-sin yaw, cos yaw) unless the body would enter a wall."""
    x0, z0, yaw0 = start
    n, frames = actions.shape
    yaw = (yaw0 + TURN * np.cumsum((actions == RIGHT).astype(np.int64) - (actions == LEFT), 1)) % 360  # right adds
    fwd = actions == FORWARD
    if np.any(fwd & (yaw % 90 != 0)):
        raise ValueError("a forward frame at a yaw that is not a multiple of 90°: hold turns 9 frames")
    q = yaw // 90                                   # forwards only ever run along an axis: +z, -x, -z, +x at q = 0..3
    dx, dz = (np.where(fwd, np.array(d)[q], 0) for d in ([0, -1, 0, 1], [1, 0, -1, 0]))   # (n, frames) each
    x, z = np.full(n, x0), np.full(n, z0)
    xs, zs = np.empty((n, frames), np.int64), np.empty((n, frames), np.int64)
    for t in range(frames):
        nx, nz = x + STEP * dx[:, t], z + STEP * dz[:, t]
        free = world[(nx + RADIUS * dx[:, t]) // UNIT, (nz + RADIUS * dz[:, t]) // UNIT] == 0
        x, z = np.where(free, nx, x), np.where(free, nz, z)
        xs[:, t], zs[:, t] = x, z
    zeros = np.zeros((n, frames))
    return np.stack([actions, xs / UNIT, zeros + EYE, zs / UNIT, yaw, zeros], -1).astype(np.float32)


def chamfer(xz: np.ndarray, context: int) -> np.ndarray:
    """Symmetric Chamfer distance (n,) between ground points (x, z) xz[:, :context] and the rest (App. A.1):
    mean nearest-neighbour Euclidean distance in both directions, summed."""
    a, b = xz[:, :context].astype(np.float64), xz[:, context:].astype(np.float64)
    # |a - b|² = |a|² + |b|² - 2 a·b, one (n, C, F - C) array instead of (n, C, F - C, 2)
    d2 = np.maximum((a ** 2).sum(-1)[:, :, None] + (b ** 2).sum(-1)[:, None, :] - 2 * a @ b.transpose(0, 2, 1), 0)
    return np.sqrt(d2.min(2)).mean(1) + np.sqrt(d2.min(1)).mean(1)


def path_stats(poses: np.ndarray) -> dict:
    """Distance covered (cells) and the fraction of forward frames on which the agent actually moved."""
    step = np.abs(np.diff(poses[:, [1, 3]], axis=0)).sum(1)
    fwd = poses[1:, 0] == FORWARD
    return dict(distance=float(step.sum()), forward=float(np.mean(poses[:, 0] == FORWARD)),
                moved=float((step[fwd] > 0).mean()) if fwd.any() else 1.0)


# ------------------------------------ first-person ray casting: one ray per image column, all frames at once
@lru_cache(maxsize=8)
def _lut(size: int) -> np.ndarray:
    """Colour table: (type, side, v, u) wall texels, then one floor/ceiling colour per image row."""
    i, j = np.mgrid[:TEX, :TEX]                     # one texture pattern per wall type: (8, TEX, TEX) in {0, 1}
    mortar = (i % 4 == 0) | ((j + 4 * (i // 4 % 2)) % 8 == 0)
    pattern = np.stack([i // 2 % 2, j // 2 % 2, (i // 2 + j // 2) % 2, ~mortar, (i + j) // 2 % 2, (i // 4 + j // 4) % 2,
                        (i % 7 == 0) | (j % 7 == 0), (i % 4 < 2) & (j % 4 < 2)]).astype(np.float32)
    tex = PALETTE[1:9, None, None].astype(np.float32) * (0.8 + 0.4 * pattern)[..., None]
    tex = np.stack([tex, 0.75 * tex], 1)            # faces crossed going along x are darker: corners read
    r = np.abs(np.arange(size) + 0.5 - size / 2) / (size / 2)        # 0 at the horizon, 1 at the edge
    sky = np.where((np.arange(size) < size / 2)[:, None], PALETTE[-1], PALETTE[0])
    rows = sky * (0.55 + 0.45 * r)[:, None]         # darker towards the horizon: depth cue
    return np.concatenate([tex.reshape(-1, 3), rows]).round().clip(0, 255).astype(np.uint8)


def render(world: np.ndarray, poses: np.ndarray, size: int, fov: float = 70.0, faces: bool = False):
    """Frames (n, size, size, 3) uint8 seen from poses (n, 6) (x, z, yaw as in the module docstring) in `world`;
    faces=True adds (the memory probe's) the wall face each column shows, (n, size) int64 ids 4·(row·width + column)
    + side (0/1: entered going +/- z, 2/3: going +/- x), and the wall's pixels (n, size, size) bool."""
    n, f = len(poses), math.tan(math.radians(fov) / 2)
    # the heading (-sin yaw, cos yaw) in (x, z) is (cos th, sin th) in (z, x), th = -yaw
    th = np.radians(-poses[:, 4].astype(np.float64) % 360)          # mod 360: one float angle per view
    cam = (2 * (np.arange(size) + 0.5) / size - 1) * f               # screen x, left to right
    # ray = heading + cam · right, right = the heading at yaw + 90° (a right turn): (sin th, -cos th) in (z, x);
    # |heading·ray| = 1, so the ray parameter at a wall is the perpendicular (fish-eye free) distance.
    rdz = (np.cos(th)[:, None] + cam * np.sin(th)[:, None]).ravel()  # (n·size,)
    rdx = (np.sin(th)[:, None] - cam * np.cos(th)[:, None]).ravel()
    pz, px = np.repeat(poses[:, 3].astype(np.float64), size), np.repeat(poses[:, 1].astype(np.float64), size)
    mz, mx = np.floor(pz).astype(np.int64), np.floor(px).astype(np.int64)
    with np.errstate(divide="ignore"):
        ddz, ddx = np.abs(1 / rdz), np.abs(1 / rdx)                  # ray length per cell crossed
    sz, sx = np.where(rdz < 0, -1, 1), np.where(rdx < 0, -1, 1)
    tz = np.where(rdz < 0, pz - mz, mz + 1 - pz) * ddz               # ray length to the next z line
    tx = np.where(rdx < 0, px - mx, mx + 1 - px) * ddx
    ray, dist, face = np.arange(n * size), np.empty(n * size), np.empty(n * size, np.int64)
    while ray.size:                                 # DDA: step to the nearer grid line until a wall
        across_z = tz < tx
        t = np.where(across_z, tz, tx)
        mz, mx = mz + np.where(across_z, sz, 0), mx + np.where(across_z, 0, sx)
        tz, tx = tz + np.where(across_z, ddz, 0), tx + np.where(across_z, 0, ddx)
        hit = world[mx, mz] > 0
        dist[ray[hit]] = t[hit]
        face[ray[hit]] = ((mx * world.shape[1] + mz) * 4 + np.where(across_z, sz < 0, 2 + (sx < 0)))[hit]
        ray, mz, mx, tz, tx, ddz, ddx, sz, sx = (a[~hit] for a in (ray, mz, mx, tz, tx, ddz, ddx, sz, sx))
    wall, xside = world.ravel()[face // 4].astype(np.int64), face % 4 >= 2   # the face tells type and side
    # texture column u: where along the face the ray hit, mirrored so u runs left to right on screen
    along = np.where(xside, pz + dist * rdz, px + dist * rdx)
    u = np.where(np.where(xside, rdx < 0, rdz > 0), 1 - along % 1, along % 1)
    base = ((wall - 1) * 2 + xside) * TEX * TEX + np.minimum(u * TEX, TEX - 1).astype(np.int64)
    # a row at yc pixels below the horizon sees height EYE - yc · dist · 2f / size on the wall plane;
    # v = WALL - that height counts cells down from the wall top, the wall is where 0 <= v < WALL
    yc = (np.arange(size, dtype=np.float32) + 0.5 - size / 2)
    v = (WALL - EYE) + yc[None, :, None] * (dist * 2 * f / size).astype(np.float32).reshape(n, 1, size)
    inwall = (v >= 0) & (v < WALL)                                   # (n, size, size)
    texel = base.reshape(n, 1, size).astype(np.int16) + ((v * TEX).astype(np.int16) & (TEX - 1)) * TEX
    rows = (8 * 2 * TEX * TEX + np.arange(size, dtype=np.int16))[None, :, None]
    frames = np.take(_lut(size), np.where(inwall, texel, rows), axis=0)  # 4x faster than lut[index] here
    return (frames, face.reshape(n, size), inwall) if faces else frames


# --------------------------------- frame store: KEY.frames = uint64 offsets[frames + 1], PNGs; KEY.npy poses
def atomic_write(path: str, write) -> None:
    """write(tmp) to a temporary name beside `path`, then rename: a killed job leaves no valid-looking file. Every
    file of every stage is written here; tmp keeps the extension (np.save, ffmpeg, matplotlib, PIL choose by it)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:                            # a full disk or a read-only folder: one line, nothing left
        raise OSError(f"cannot write {path}: {e.strerror or e} (is the disk full or the folder read-only?)") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1, sort_keys=True)))


def encode_png(frame: np.ndarray) -> bytes:
    """A minimal RGB PNG (filter 0, zlib level 1): 4x faster than PIL's encoder; any PNG reader decodes it."""
    h, w, _ = frame.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), frame.reshape(h, w * 3)], 1)   # filter byte per row
    chunk = lambda tag, body: struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 1)) + chunk(b"IEND", b""))


def write_frames(path: str, frames, count: int) -> None:
    """Stream `count` RGB uint8 frames into a packed PNG file; fails (leaving nothing) on another count."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(bytes(8 * (count + 1)))        # offsets, filled in once every frame is written
            offsets = [fh.tell()]
            for frame in frames:
                fh.write(encode_png(np.ascontiguousarray(frame, np.uint8)))
                offsets.append(fh.tell())
            if len(offsets) != count + 1:
                raise ValueError(f"{path}: got {len(offsets) - 1} frames, expected {count}")
            fh.seek(0)
            fh.write(np.array(offsets, "<u8").tobytes())
    atomic_write(path, write)


def load_index(root: str) -> dict[str, int]:
    return json.loads(Path(root, "index.json").read_text())


def read_frames(root: str, key: str, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Frames [start, stop) of one video, (n, H, W, 3) uint8, reading only their bytes."""
    with open(os.path.join(root, f"{key}.frames"), "rb") as fh:
        frames = int(np.frombuffer(fh.read(8), "<u8")[0]) // 8 - 1
        stop = frames if stop is None else stop
        if not 0 <= start < stop <= frames:
            raise IndexError(f"{root}/{key}.frames: range [{start}, {stop}) outside 0..{frames}")
        fh.seek(8 * start)
        off = np.frombuffer(fh.read(8 * (stop - start + 1)), "<u8").astype(np.int64)
        fh.seek(off[0])
        blob = fh.read(off[-1] - off[0])
    try:
        return np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("RGB"))
                         for a, b in zip(off[:-1] - off[0], off[1:] - off[0])])   # offsets within the blob
    except (OSError, ValueError) as e:              # a corrupt or truncated store
        raise ValueError(f"{root}/{key}.frames: frames [{start}, {stop}) are not readable PNGs ({e})") from None


def read_actions(root: str, key: str) -> np.ndarray:
    """Poses (frames, 6) [action, x, y, z, yaw, pitch], checked: finite, with action ids 0, 1, 2."""
    poses = np.load(os.path.join(root, f"{key}.npy")).astype(np.float32)
    ok = poses.ndim == 2 and poses.shape[1] == 6 and np.isfinite(poses).all()
    if not (ok and np.isin(poses[:, 0], (FORWARD, LEFT, RIGHT)).all()):
        raise ValueError(f"{root}/{key}.npy: expected finite (frames, 6) poses with action ids 0-2, got {poses.shape}")
    return poses


def load_world(root: str, key: str) -> np.ndarray | None:
    path = os.path.join(root, f"{key}.world.npy")
    return np.load(path) if os.path.exists(path) else None


# ---------------------------------- maze generation: plan (world, actions, real path), then render and write
def _plan(cfg: MazeConfig, split: str, i: int):
    """(world, poses (frames, 6), Chamfer) of train video or test candidate i. A test candidate simulates cfg.candidates
    walks (with collisions; the paper integrates a collision-free plane), picks one of the cfg.lowest lowest Chamfer."""
    rng = np.random.default_rng([cfg.seed, ("train", "test").index(split), i])
    world = make_world(rng, cfg.world, cfg.density)
    start = start_state(rng, world)
    if cfg.walk == "loopcraft":
        walks = random_walk(rng, cfg.frames, 1 if split == "train" else cfg.candidates)
    else:
        turn = [int(rng.integers(LEFT, RIGHT + 1))]
        walks = np.resize(turn if cfg.walk == "spin" else [FORWARD] * HOLD * cfg.leg + turn * 2 * HOLD, (1, cfg.frames))
    poses = simulate(world, walks, start)
    d = chamfer(poses[..., [1, 3]], cfg.context)
    pick = 0 if len(d) == 1 else int(np.argsort(d, kind="stable")[rng.integers(cfg.lowest)])
    return world, poses[pick], float(d[pick])


def _write_maze_video(out: str, key: str, cfg: MazeConfig, world: np.ndarray, poses: np.ndarray) -> None:
    write_frames(os.path.join(out, f"{key}.frames"), render(world, poses, cfg.size, cfg.fov), len(poses))
    for name, array in ((f"{key}.world.npy", world), (f"{key}.npy", poses)):
        atomic_write(os.path.join(out, name), lambda tmp: np.save(tmp, array))


class Progress:
    """Progress of `total` items: on a terminal a live tqdm bar (position, rate, ETA); in a log, every `every` items, a
    line "what n/total (p%), rate/s, eta h:mm:ss" (every=0: the caller prints line()); show=False (rank > 0): none."""
    def __init__(self, what: str, total: int, every: int | None = None, show: bool = True):
        self.what, self.total, self.done, self.start = what, total, 0, time.perf_counter()
        self.every = (max(1, total // 10) if every is None else every) if show else 0
        self.bar = tqdm(total=total, desc=what, dynamic_ncols=True) if show and sys.stderr.isatty() else None

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        left = elapsed / max(self.done, 1) * (self.total - self.done)
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days"
        return f"{self.what} {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%), " \
               f"{self.done / elapsed:.2f}/s, eta {eta}"

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.bar is not None:
            self.bar.update(n)
        elif self.every and self.done // self.every > before // self.every and self.done < self.total:
            print(self.line(), flush=True)

    def write(self, text: str) -> None:  # a log line; on a terminal above the bar
        tqdm.write(text) if self.bar is not None else print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _map(fn, jobs: list[tuple], workers: int, what: str = "") -> list:
    """[fn(*job) for job in jobs], across `workers` processes when > 1, in tenths; `what`: show progress."""
    out, progress = [], Progress(what, len(jobs), show=bool(what))
    with Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for part in np.array_split(np.arange(len(jobs)), min(10, len(jobs)) or 1):
            out += pool.starmap(fn, [jobs[i] for i in part]) if pool else [fn(*jobs[i]) for i in part]
            progress.update(len(part))
    progress.close()
    return out


def make_maze(out: str, cfg: MazeConfig, split: str = "train") -> dict:
    """Write a maze frame store to `out`, resumably: meta.json (the settings) first, each video unless a rerun finds its
    files complete, index.json last; a store begun with other settings or pre-MineRL poses is rebuilt, saying so."""
    if split not in ("train", "test") or not 0 < cfg.context < cfg.frames:
        raise ValueError(f"split {split!r}, context {cfg.context}: expected 'train' or 'test', 0 < context < frames")
    Path(out, "index.json").unlink(missing_ok=True)    # rewriting a store: unmark it first
    n = cfg.videos if split == "train" else cfg.test_videos
    plans = _map(_plan, [(cfg, split, i) for i in range(n if split == "train" else cfg.pool * n)], cfg.workers,
                 f"{out}: planning walks")
    if split == "test":                             # the farthest-travelled: drops stuck agents (App. A.1)
        far = np.argsort([-path_stats(p)["distance"] for _, p, _ in plans], kind="stable")[:n]
        plans = [plans[i] for i in sorted(far)]
    keys = [f"{i // 1000:03d}/{i % 1000:03d}" for i in range(n)]    # Loopcraft's key of video i
    stats = {s: float(np.mean([path_stats(p)[s] for _, p, _ in plans])) for s in ("forward", "moved")}
    config, chamfer = {k: v for k, v in asdict(cfg).items() if k != "workers"}, np.mean([c for _, _, c in plans])
    meta = json.loads(json.dumps(dict(source="maze", poses="minerl", size=cfg.size, fps=20, split=split,
                                      context=cfg.context, config=config, chamfer=float(chamfer), **stats)))
    if Path(out, "meta.json").exists() and json.loads(Path(out, "meta.json").read_text()) != meta:
        print(f"{out}: begun with other settings; rebuilding it from scratch")
        shutil.rmtree(out)
    write_json(os.path.join(out, "meta.json"), meta)
    done = lambda k: all(os.path.exists(os.path.join(out, k + ext)) for ext in (".frames", ".npy", ".world.npy"))
    _map(_write_maze_video, [(out, k, cfg, w, p) for k, (w, p, _) in zip(keys, plans) if not done(k)], cfg.workers,
         f"{out}: rendering videos")
    write_json(os.path.join(out, "index.json"), {k: cfg.frames for k in keys})
    return meta


# ---------------------- Loopcraft: the released layout (index.json, NNN/MMM.mp4, NNN/MMM.npy) -> frame store
def _prepare_one(src: str, dst: str, key: str, count: int) -> tuple[int, int]:
    mp4, npy = os.path.join(src, f"{key}.mp4"), os.path.join(src, f"{key}.npy")
    if missing := [path for path in (mp4, npy) if not os.path.isfile(path)]:
        raise FileNotFoundError(f"{missing[0]}: missing (listed in {src}/index.json)")
    poses = np.load(npy)
    if poses.shape != (count, 6):                   # frames as index.json says, 6 pose values each
        raise ValueError(f"{npy}: expected shape ({count}, 6) = (frames in index.json, 6), got {poses.shape}")
    if bad := sorted(set(np.unique(poses[:, 0]).tolist()) - {FORWARD, LEFT, RIGHT}):
        raise ValueError(f"{npy}: action ids must be 0 (forward), 1 (left) or 2 (right), found {bad[:5]}")
    import imageio_ffmpeg
    try:                                            # not a video, ffmpeg failing mid-stream, or a wrong count
        reader = imageio_ffmpeg.read_frames(mp4, pix_fmt="rgb24")
        w, h = next(reader)["size"]
        frames = (np.frombuffer(b, np.uint8).reshape(h, w, 3) for b in reader)
        write_frames(os.path.join(dst, f"{key}.frames"), frames, count)
    except (OSError, RuntimeError, StopIteration, ValueError) as e:
        raise ValueError(f"{mp4}: cannot decode {count} frames ({e})") from None
    atomic_write(os.path.join(dst, f"{key}.npy"), lambda tmp: np.save(tmp, poses.astype(np.float32)))
    return w, h


def prepare(src: str, dst: str, workers: int = 2) -> dict[str, int]:
    """Convert and validate every video listed in src/index.json; dst/index.json is written last."""
    try:
        index = load_index(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"{src}/index.json: cannot read ({e})") from None
    if not isinstance(index, dict) or not all(isinstance(v, int) and v > 0 for v in index.values()):
        raise ValueError(f"{src}/index.json: expected {{key: frames > 0}}")
    Path(dst, "index.json").unlink(missing_ok=True)    # rewriting a store: unmark it first
    sizes = sorted(set(_map(_prepare_one, [(src, dst, k, n) for k, n in sorted(index.items())], workers, dst)))
    (w, h), *others = sizes
    if others or w != h:                            # every stage assumes one square frame size
        raise ValueError(f"{src}: videos must all have one square size, got (w, h) {sizes}")
    write_json(os.path.join(dst, "meta.json"), dict(source="loopcraft", size=h, fps=20, context=MazeConfig().context))
    write_json(os.path.join(dst, "index.json"), dict(sorted(index.items())))
    return index


# ------------------------------------------------------------------------------------------- maps and `show`
def draw_map(world: np.ndarray | None, poses: np.ndarray, split: int, size: int) -> np.ndarray:
    """Top-down map (size, size, 3) uint8 of the ground (x, z) as Minecraft's map shows it, x (east) right, z
    (south) down: the maze's world cells in PALETTE colours (Loopcraft, world None: grey, fitted to the path), the
    path of the first `split` frames in white, later frames in black, the last pose as a red dot with its heading."""
    xz = poses[:, [1, 3]].astype(np.float64)
    if world is not None:                           # cell (row, column) spans x in [row, row + 1), z likewise
        lo, hi = np.zeros(2), np.array(world.shape, float)
        img = Image.fromarray(PALETTE[world.T]).resize((size, size), Image.NEAREST)      # image (z, x)
    else:
        mid, half = (xz.min(0) + xz.max(0)) / 2, (xz.max(0) - xz.min(0)).max() / 2 + 2
        lo, hi = mid - half, mid + half
        img = Image.new("RGB", (size, size), (40, 40, 40))
    pix = (xz - lo) / (hi - lo) * size              # (image column, image row)
    draw, pts = ImageDraw.Draw(img), [tuple(p) for p in pix]
    for part, colour in ((pts[:split], "white"), (pts[max(split - 1, 0):], "black")):
        if len(part) > 1:
            draw.line(part, fill=colour, width=max(1, size // 128))
    (x, z), yaw, r = pix[-1], math.radians(float(poses[-1, 4])), max(2, size // 64)
    draw.line([(x, z), (x - 3 * r * math.sin(yaw), z + 3 * r * math.cos(yaw))], fill="red", width=max(1, r // 2))
    draw.ellipse([x - r, z - r, x + r, z + r], fill="red")
    return np.asarray(img)


def write_video(path: str, frames, fps: int = 20) -> None:
    """np.uint8 (H, W, 3) frames -> a .gif (Pillow) or an H.264 .mp4 (imageio-ffmpeg), atomically."""
    def write(tmp):
        if path.endswith(".gif"):
            first, *rest = (Image.fromarray(f) for f in frames)
            return first.save(tmp, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
        import imageio.v2 as imageio
        with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8) as w:
            for f in frames:  # H.264 with yuv420p needs even sides
                w.append_data(np.pad(f, ((0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0))))
    atomic_write(path, write)


def show(root: str, key: str, out: str, side: int = 256) -> None:
    """The video next to the map (PNG: 8 moments; GIF/MP4: every frame)."""
    frames, poses, world = read_frames(root, key), read_actions(root, key), load_world(root, key)
    split = json.loads(Path(root, "meta.json").read_text()).get("context", 256)  # where the path changes colour
    png = out.lower().endswith(".png")
    moments = np.linspace(0, len(frames) - 1, 8).round().astype(int) if png else range(len(frames))
    panels = [np.concatenate([np.asarray(Image.fromarray(frames[t]).resize((side, side), Image.NEAREST)),
                              draw_map(world, poses[:t + 1], split, side)], 1) for t in moments]  # (side, 2·side, 3)
    if not png:
        return write_video(out, panels)
    atomic_write(out, lambda tmp: Image.fromarray(np.concatenate(panels, 0)).save(tmp))


def bench(cfg: MazeConfig) -> None:
    plans = [_plan(cfg, "train", i) for i in range(4)] * 3
    t, c = time.perf_counter(), time.process_time()  # CPU time too: the machine may be shared
    n = sum(len(render(w, p, cfg.size, cfg.fov)) for w, p, _ in plans)
    print(f"render {cfg.size}x{cfg.size}: {n / (time.process_time() - c):,.0f} frames per CPU-second, "
          f"{n / (time.perf_counter() - t):,.0f} frames/s wall, one core")
    with tempfile.TemporaryDirectory() as root:  # generation itself prints its progress and ETA
        count, t = min(cfg.videos, 4 * cfg.workers), time.perf_counter()    # a sample, also at paper scale
        make_maze(root, replace(cfg, videos=count), "train")
        dt, rng = (time.perf_counter() - t) / count, np.random.default_rng(0)
        print(f"generate train: {cfg.frames / dt:,.0f} frames/s with writing, {cfg.workers} workers ({count} videos; "
              f"all {cfg.videos}: {cfg.videos * dt / 60:.1f} min)")
        t = time.perf_counter()
        for key, f in zip(rng.choice(sorted(load_index(root)), 2000), rng.integers(cfg.frames, size=2000).tolist()):
            read_frames(root, str(key), f, f + 1)
        print(f"random single-frame reads: {2000 / (time.perf_counter() - t):,.0f}/s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="maze and bench take any MazeConfig "
                                "setting as --key=value (--videos counts the chosen split's videos)")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd, text, args in (("prepare", "released Loopcraft layout -> frame store", ("src", "dst", "--workers")),
                            ("show", "video next to its top-down map (.png, .gif or .mp4)", ("root", "key", "--out")),
                            ("maze", "generate a maze frame store", ("--out", "--split", "--preset")),
                            ("bench", "print rendering, generation and frame-read speeds", ("--split", "--preset"))):
        q = sub.add_parser(cmd, help=text)
        for a in args:
            q.add_argument(a, **{"--out": dict(required=True), "--workers": dict(type=int, default=2),
                                 "--split": dict(choices=["train", "test"], default="train"),
                                 "--preset": dict(choices=sorted(PRESETS), default="toy")}.get(a, {}))
    a, rest = p.parse_known_args(argv)
    if a.cmd in ("prepare", "show") and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "prepare":
        return print(f"prepared {len(prepare(a.src, a.dst, a.workers))} videos into {a.dst}")
    if a.cmd == "show":
        return show(a.root, a.key, a.out)
    over = parse_overrides(rest)
    if a.split == "test" and "videos" in over:
        over["test_videos"] = over.pop("videos")
    print(cfg := maze_config(a.preset, **over))
    if a.cmd == "bench":
        return bench(cfg)
    t = time.perf_counter()
    meta = make_maze(a.out, cfg, a.split)
    print(f"wrote {a.out} in {time.perf_counter() - t:.1f} s: mean Chamfer {meta['chamfer']:.2f} cells, "
          f"forward {meta['forward']:.3f}, moving on {meta['moved']:.3f} of forward frames")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a bad setting, a missing or malformed file: one line naming it
        raise SystemExit(f"error: {e}") from None
