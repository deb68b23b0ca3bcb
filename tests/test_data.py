"""Tests for data.py: action semantics by hand, the random walk's statistics, the maze's bump rate and
test-split overlap, byte-identical generation, the stores, and Loopcraft `prepare` with bad inputs."""
import json
import math
import os
import sys
import time
from dataclasses import replace

import imageio
import numpy as np
import pytest

import data
from data import FORWARD, LEFT, RIGHT


def open_world(n=6):
    w = np.zeros((n, n), np.uint8)
    w[0, :] = w[-1, :] = w[:, 0] = w[:, -1] = 1
    return w


def centre(x, z, yaw):
    """A start in the middle of cell (x, z) = (row, column) of the world, in 1/UNIT cells."""
    return (x * data.UNIT + data.UNIT // 2, z * data.UNIT + data.UNIT // 2, yaw)


# --- action semantics, hand-computed: poses are MineRL's [action, x, y, z, yaw, pitch], y up -----------

def test_held_turn_is_exactly_90_degrees_and_frame_t_follows_action_t():
    poses = data.simulate(open_world(), np.array([[RIGHT] * 9 + [LEFT] * 18]), centre(2, 2, 0))[0]
    assert poses.dtype == np.float32 and poses.shape == (27, 6)
    np.testing.assert_array_equal(poses[:9, 4], np.arange(10, 91, 10))      # right adds; frame 0 already turned 10°
    assert poses[17, 4] == 0 and poses[26, 4] == 270                        # left turns subtract, wrapping to 270
    np.testing.assert_array_equal(poses[:, [1, 3]], 2.5)                    # turning never moves
    np.testing.assert_array_equal(poses[:, 0], [RIGHT] * 9 + [LEFT] * 18)
    assert np.all(poses[:, 2] == data.EYE) and np.all(poses[:, 5] == 0)     # y: the eye height; pitch 0


# facing (-sin yaw, cos yaw) in (x, z): yaw 0 faces +z, 90 (a right turn from 0) -x, 180 -z, 270 +x
@pytest.mark.parametrize("yaw,dx,dz", [(0, 0, 1), (90, -1, 0), (180, 0, -1), (270, 1, 0)])
def test_held_forward_in_free_space_moves_exactly_one_cell(yaw, dx, dz):
    assert (dx, dz) == (round(-math.sin(math.radians(yaw))), round(math.cos(math.radians(yaw))))
    poses = data.simulate(open_world(), np.zeros((1, 9), np.int64), centre(2, 2, yaw))[0]
    steps = np.arange(1, 10) / 9
    np.testing.assert_allclose(poses[:, 1], 2.5 + dx * steps, atol=1e-6)
    np.testing.assert_allclose(poses[:, 3], 2.5 + dz * steps, atol=1e-6)
    assert poses[-1, 1] == 2.5 + dx and poses[-1, 3] == 2.5 + dz             # exactly, not approximately
    assert np.all(poses[:, 2] == data.EYE) and np.all(poses[:, 4] == yaw)


def test_poses_of_a_short_walk_by_hand():
    # from the middle of cell (x=2, z=3) facing +z: a held right turn, 2 forwards, a held left turn, 1 forward
    actions = [RIGHT] * 9 + [FORWARD] * 2 + [LEFT] * 9 + [FORWARD]
    poses = data.simulate(open_world(), np.array([actions]), centre(2, 3, 0))[0]
    E, s = data.EYE, 1 / 9                               # one forward frame: 1/9 cell
    want = {0: [RIGHT, 2.5, E, 3.5, 10, 0],              # a right turn adds 10°
            8: [RIGHT, 2.5, E, 3.5, 90, 0],              # facing (-sin 90°, cos 90°) = -x
            9: [FORWARD, 2.5 - s, E, 3.5, 90, 0],        # so forward lowers x
            10: [FORWARD, 2.5 - 2 * s, E, 3.5, 90, 0],
            11: [LEFT, 2.5 - 2 * s, E, 3.5, 80, 0],      # a left turn subtracts 10°
            19: [LEFT, 2.5 - 2 * s, E, 3.5, 0, 0],       # facing +z again
            20: [FORWARD, 2.5 - 2 * s, E, 3.5 + s, 0, 0]}
    for t, pose in want.items():
        np.testing.assert_allclose(poses[t], pose, atol=1e-6, err_msg=f"frame {t}")


def test_wall_stops_motion():
    w = open_world()
    w[2, 3] = 5                                        # a wall right in front of cell (x=2, z=2) facing +z
    poses = data.simulate(w, np.zeros((1, 18), np.int64), centre(2, 2, 0))[0]
    # eye at 9/18 of the cell, body reaches 4/18 ahead: 11 and 13 fit (13 + 4 < 18), 15 would not
    np.testing.assert_array_equal(poses[:, 3] * 18, [2 * 18 + 11] + [2 * 18 + 13] * 17)
    assert data.path_stats(poses)["moved"] == pytest.approx(1 / 17)


def test_unheld_turn_before_forward_is_rejected():
    with pytest.raises(ValueError, match="hold turns 9 frames"):
        data.simulate(open_world(), np.array([[LEFT, FORWARD]]), centre(2, 2, 0))


# --- Loopcraft's random walk ------------------------------------------------------------------------

def test_random_walk_bundles_match_loopcraft_parameters():
    rng, N = np.random.default_rng(0), 20_000
    bundles = [np.array(data.bundle(rng)) for _ in range(N)]
    k = np.array([np.sum(b != FORWARD) for b in bundles])
    m = np.array([np.sum(b == FORWARD) - 1 for b in bundles])
    assert all(b[0] == FORWARD and len(set(b[b != FORWARD])) == 1 for b in bundles)  # one direction
    freq = np.bincount(k, minlength=5)[1:] / N
    p = np.array(data.TURN_P)
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / N))           # 4 standard errors
    assert np.all((m >= k) & (m <= 3 * k - 1))
    m4 = np.bincount(m[k == 4] - 4, minlength=8) / np.sum(k == 4)             # uniform over 4..11
    assert np.all(np.abs(m4 - 1 / 8) < 4 * np.sqrt(1 / 8 * 7 / 8 / np.sum(k == 4)))
    # the shuffle is uniform: the first slot after the extra forward is a turn with probability k/(k+m)
    first_turn = np.array([b[1] != FORWARD for b in bundles])
    expect = np.mean(k / (k + m))
    assert abs(first_turn.mean() - expect) < 4 * np.sqrt(expect * (1 - expect) / N)


def test_random_walk_holds_each_action_and_is_68_percent_forward():
    walks = data.random_walk(np.random.default_rng(1), 9 * 300, 200)
    held = walks.reshape(200, 300, 9)
    assert np.all(held == held[..., :1])                                        # 9-frame holds
    # forward fraction = 6.5 / 9.5 per bundle; tolerance from the spread of per-walk fractions
    per_walk = np.mean(walks == FORWARD, 1)
    assert abs(per_walk.mean() - 6.5 / 9.5) < 4 * per_walk.std() / np.sqrt(200)
    assert abs(per_walk.mean() - 0.68) < 0.01


# --- the maze: bumps are rare, the test split revisits its context -----------------------------------

def test_agent_moves_on_most_forward_frames_and_test_split_revisits_context():
    cfg = data.maze_config("toy")
    train = [data._plan(cfg, "train", i) for i in range(60)]
    moved = np.mean([data.path_stats(p)["moved"] for _, p, _ in train])
    assert moved >= 0.85
    test = [data._plan(cfg, "test", i) for i in range(12)]
    # Chamfer of the real path, recomputed from the poses the plan returns
    ch_train = np.mean([data.chamfer(p[None, :, [1, 3]], cfg.context)[0] for _, p, _ in train])
    ch_test = np.mean([data.chamfer(p[None, :, [1, 3]], cfg.context)[0] for _, p, _ in test])
    assert ch_test < 0.5 * ch_train
    assert np.isclose(ch_test, np.mean([c for _, _, c in test]))


def test_chamfer_hand_computed():
    xy = np.array([[[0, 0], [0, 1], [3, 0], [0, 1]]], np.float32)           # context 2 points, rest 2
    # context -> rest: 0 -> (0,1): 1, (0,1) -> (0,1): 0 ; rest -> context: (3,0): 3, (0,1): 0
    assert data.chamfer(xy, 2)[0] == pytest.approx((1 + 0) / 2 + (3 + 0) / 2)


def test_render_wall_height_and_colour_identity():
    w = open_world(12)
    w[3, 9] = 4                                        # wall face 5.5 cells ahead of (x=3.5, z=3.5) facing +z
    frame = data.render(w, np.array([[FORWARD, 3.5, data.EYE, 3.5, 0, 0]]), 64, fov=70)[0]
    col = frame[:, 32].astype(int)
    wall = np.any(col != data._lut(64)[-64:], 1)       # rows of the centre column that are not floor/sky
    # pinhole: a point h cells above the eye at distance d is h · (size/2) / (d · tan(fov/2)) rows up
    rows = lambda h: math.floor(h * 32 / (5.5 * math.tan(math.radians(35))) + 0.5)   # pixel centres
    assert wall[32:].sum() == rows(data.EYE) == 4 and wall[:32].sum() == rows(data.WALL - data.EYE) == 17
    assert np.all(wall[32 - 17:32 + 4])                # one contiguous span
    # every textured, shaded texel keeps its type's chromaticity closest: coarse levels keep colour
    chroma = lambda c: c / c.sum(-1, keepdims=True)
    texels = data._lut(64)[:8 * 2 * 64].astype(float).reshape(8, 2 * 64, 3)
    nearest = np.argmin(np.abs(chroma(texels)[:, :, None] - chroma(data.PALETTE[1:9].astype(float))).sum(-1), -1)
    assert np.all(nearest == np.arange(8)[:, None])
    assert np.argmin(np.abs(chroma(col[33].astype(float)) - chroma(data.PALETTE[1:9].astype(float))).sum(-1)) == 3


def test_render_looks_along_the_yaw_and_a_right_turn_looks_right():
    # the middle of a 5x5 room; a face id is 4·(row·5 + column) + side, and (row, column) = (x, z)
    yaws = [0, 90, 180, 270, 45]
    poses = np.array([[FORWARD, 2.5, data.EYE, 2.5, yaw, 0] for yaw in yaws], np.float32)
    _, face, _ = data.render(open_world(5), poses, 32, faces=True)
    cell = np.stack([face // 4 // 5, face // 4 % 5], -1).tolist()    # (5 yaws, 32 columns): (x, z) of the wall
    # the centre of the view is the wall 2 cells along (-sin yaw, cos yaw): +z, -x, -z, +x, entered going that way
    for i, want in enumerate([[2, 4], [0, 2], [2, 0], [4, 2]]):
        assert cell[i][15] == cell[i][16] == want
    assert (face[:4, 15] % 4).tolist() == [0, 3, 1, 2]                # sides: +z 0, -z 1, +x 2, -x 3
    # yaw 45 faces between +z and -x: the left edge (yaw ~11°) sees the +z wall, the right edge (yaw ~79°, what a
    # right turn brings into view) the -x wall
    assert cell[4][0] == [2, 4] and cell[4][31] == [0, 2]
    # facing +z (yaw 0), +x is on the left: Minecraft's south-facing view, east to the left
    assert cell[0][0] == [3, 4] and cell[0][31] == [1, 4]


# --- generation, determinism, frame store -----------------------------------------------------------

def files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as fh:
                out[os.path.relpath(os.path.join(d, n), root)] = fh.read()
    return out


def test_same_seed_same_bytes_regardless_of_workers(tmp_path):
    cfg = data.maze_config("tiny", videos=4, test_videos=2, frames=40, context=16, candidates=20, pool=2)
    data.make_maze(tmp_path / "a", replace(cfg, workers=1), "test")
    data.make_maze(tmp_path / "b", replace(cfg, workers=2), "test")
    data.make_maze(tmp_path / "c", replace(cfg, seed=1, workers=1), "test")
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)
    assert a["000/000.frames"] != c["000/000.frames"]
    assert data.load_index(tmp_path / "a") == {"000/000": 40, "000/001": 40}
    poses, world = data.read_actions(tmp_path / "a", "000/001"), data.load_world(tmp_path / "a", "000/001")
    assert poses.shape == (40, 6) and poses.dtype == np.float32 and world.shape == (16, 16)
    frames = data.read_frames(tmp_path / "a", "000/001")
    assert frames.shape == (40, 32, 32, 3) and frames.dtype == np.uint8
    # the stored frames are the ground-truth renders of the stored poses
    np.testing.assert_array_equal(frames, data.render(world, poses, 32, cfg.fov))
    np.testing.assert_array_equal(data.read_frames(tmp_path / "a", "000/001", 7, 9), frames[7:9])
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["source"] == "maze" and meta["size"] == 32 and meta["fps"] == 20 and meta["context"] == 16


def test_write_frames_count_mismatch_leaves_nothing(tmp_path):
    path = str(tmp_path / "v.frames")
    with pytest.raises(ValueError, match="expected 3"):
        data.write_frames(path, iter(np.zeros((2, 4, 4, 3), np.uint8)), 3)
    assert os.listdir(tmp_path) == []
    data.write_frames(path, np.zeros((3, 4, 4, 3), np.uint8), 3)
    with pytest.raises(IndexError, match="v.frames"):
        data.read_frames(str(tmp_path), "v", 2, 4)


def test_draw_map_colours_context_later_and_current(tmp_path):
    w = open_world(8)
    # 3 cells along +z, a left turn to yaw 270 (facing +x), 2 cells along +x: the walk ends at (x, z) = (4.5, 5.5)
    poses = data.simulate(w, np.array([[FORWARD] * 27 + [LEFT] * 9 + [FORWARD] * 18]), centre(2, 2, 0))[0]
    assert poses[-1, [1, 3, 4]].tolist() == [4.5, 5.5, 270]
    # the maze map (16 pixels a cell) and a Loopcraft map of the same poses (no world: the plane fitted to the
    # path, x in [0, 7], z in [0.5, 7.5], 64/7 pixels a cell) read them alike: x right, z down as on Minecraft's map
    for world, size, (x, z) in ((w, 128, (4.5 * 16, 5.5 * 16)), (None, 64, (4.5 / 7 * 64, 5 / 7 * 64))):
        img = data.draw_map(world, poses, 27, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert {(255, 255, 255), (0, 0, 0), (255, 0, 0)} <= {tuple(c) for c in img.reshape(-1, 3)}
        red = np.argwhere(np.all(img == (255, 0, 0), -1))             # (image row, image column) of the dot
        (r, c), right = red.mean(0), red[:, 1].max() - x             # ... and its heading, +x: to the right
        assert abs(r - z) < 1.5 and x - 1 < c < x + 2 and right > 4, (world is None, r, c, right)


# --- Loopcraft prepare --------------------------------------------------------------------------------

def clip(n, s, seed):
    """A smooth moving colour field, like a rendered view rather than noise (H.264 keeps it well)."""
    y, x = np.mgrid[:s, :s] / s
    t = np.arange(n)[:, None, None] / n
    rgb = [128 + 90 * np.sin(2 * np.pi * (x + t + 0.3 * seed)), 128 + 90 * np.cos(2 * np.pi * (y - t)),
           128 + 60 * np.sin(2 * np.pi * (x + y + 2 * t))]
    return np.stack(rgb, -1).round().clip(0, 255).astype(np.uint8)


def loopcraft_fixture(root, frames=(12, 12), actions=None):
    """Written like the authors' release: imageio-ffmpeg, libx264, yuv420p, 20 fps, (frames, 6) float32."""
    index = {}
    for i, n in enumerate(frames):
        key = f"000/{i:03d}"
        os.makedirs(root / "000", exist_ok=True)
        imageio.v2.mimwrite(root / f"{key}.mp4", clip(n, 64, i), fps=20, codec="libx264",
                            pixelformat="yuv420p", macro_block_size=16)
        a = np.random.default_rng(i).integers(0, 3, n) if actions is None else actions
        np.save(root / f"{key}.npy", np.concatenate([a[:, None], np.random.default_rng(i).normal(size=(n, 5))],
                                                     1).astype(np.float32))
        index[key] = n
    (root / "index.json").write_text(json.dumps(index))
    return index


def test_prepare_round_trip(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    index = loopcraft_fixture(src)
    assert data.prepare(str(src), str(dst), workers=1) == index
    assert data.load_index(dst) == index and json.loads((dst / "meta.json").read_text())["size"] == 64
    for i, key in enumerate(index):
        got, want = data.read_frames(dst, key).astype(int), clip(12, 64, i).astype(int)
        # H.264 at imageio's default quality with 4:2:0 chroma: ~4/255 mean error measured; allow 8/255
        assert np.abs(got - want).mean() < 8
        # order is exact: every decoded frame is nearest its own source frame
        dist = np.abs(got[:, None] - want[None]).mean((2, 3, 4))
        np.testing.assert_array_equal(dist.argmin(1), np.arange(12))
        np.testing.assert_array_equal(data.read_actions(dst, key), np.load(src / f"{key}.npy"))


def break_fixture(src, what):
    if what == "index count":
        (src / "index.json").write_text(json.dumps({"000/000": 13}))
        return "000/000.npy", r"expected shape \(13, 6\)"
    if what == "action id":
        a = np.load(src / "000/000.npy"); a[3, 0] = 3; np.save(src / "000/000.npy", a)
        return "000/000.npy", "action ids"
    if what == "shape":
        np.save(src / "000/000.npy", np.zeros((12, 5), np.float32))
        return "000/000.npy", r"expected shape \(12, 6\)"
    if what == "video count":                          # .npy and index say 13, the video has 12
        np.save(src / "000/000.npy", np.zeros((13, 6), np.float32))
        (src / "index.json").write_text(json.dumps({"000/000": 13}))
        return "000/000.mp4", "got 12 frames, expected 13"
    if what == "missing video":
        os.remove(src / "000/000.mp4")
        return "000/000.mp4", "missing"
    (src / "000/000.mp4").write_bytes(b"not a video")
    return "000/000.mp4", "decode"


@pytest.mark.parametrize("what", ["index count", "action id", "shape", "video count", "missing video", "corrupt video"])
def test_prepare_bad_inputs_name_the_file_and_leave_nothing_valid(tmp_path, what):
    src, dst = tmp_path / "src", tmp_path / "dst"
    loopcraft_fixture(src, frames=(12,))
    name, message = break_fixture(src, what)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        data.prepare(str(src), str(dst), workers=1)
    assert name in str(err.value)
    assert not dst.exists() or files(dst) == {}        # no index, no frames, no temporary files


def test_show_writes_png(tmp_path):
    cfg = data.maze_config("tiny", videos=1, frames=20, context=8, workers=1)
    data.make_maze(tmp_path / "m", cfg)
    data.main(["show", str(tmp_path / "m"), "000/000", "--out", str(tmp_path / "v.png")])
    from PIL import Image
    assert Image.open(tmp_path / "v.png").size == (2 * 256, 8 * 256)


def test_interrupted_maze_generation_resumes_video_by_video(tmp_path, monkeypatch):
    """A killed `data.py maze` keeps its finished videos (not rewritten on the rerun), and the final store
    equals an uninterrupted one byte for byte; a store begun with other settings is rebuilt."""
    cfg = data.maze_config("tiny", videos=5, frames=40, context=16, workers=1)
    data.make_maze(str(tmp_path / "straight"), cfg)
    write, calls = data._write_maze_video, []

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(args[1])
        write(*args)
    monkeypatch.setattr(data, "_write_maze_video", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        data.make_maze(str(tmp_path / "resumed"), cfg)
    assert not (tmp_path / "resumed" / "index.json").exists() and calls == ["000/000", "000/001"]
    monkeypatch.setattr(data, "_write_maze_video", write)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "resumed").rglob("000/00[01]*")}
    time.sleep(0.01)
    data.make_maze(str(tmp_path / "resumed"), cfg)
    assert len(stamps) == 6 and all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not rewritten
    files = sorted(p.relative_to(tmp_path / "straight") for p in (tmp_path / "straight").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*")
                           if p.is_file() and p.name != ".lock")
    for f in files:
        assert (tmp_path / "straight" / f).read_bytes() == (tmp_path / "resumed" / f).read_bytes(), f
    data.make_maze(str(tmp_path / "resumed"), data.maze_config("tiny", videos=3, frames=40, context=16, workers=1))
    assert sorted(data.load_index(str(tmp_path / "resumed"))) == ["000/000", "000/001", "000/002"]
    assert not (tmp_path / "resumed" / "000" / "004.frames").exists()  # rebuilt, nothing stale kept


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(capsys, monkeypatch):
    progress = data.Progress("work", 20)  # pytest's capture is no terminal: a line every tenth, none at the end
    for _ in range(20):
        progress.update()
    out = capsys.readouterr().out
    assert out.count("work ") == 9 and "work 10/20 (50%), " in out and "/s, eta 00:00:00" in out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = data.Progress("work", 20)
    progress.update(5)
    progress.write("step 5 | loss 1.0")  # log lines go above the bar
    progress.close()
    captured = capsys.readouterr()
    assert "5/20" in captured.err and "work" in captured.err and "step 5 | loss 1.0" in captured.out
    assert data.Progress("work", 20, show=False).bar is None  # ranks other than 0 show nothing
