"""The memory probe: visible wall faces from the ray caster, what each strategy can know (rollout.knowledge),
the pixel categories and the swap control, checked on hand-built cases and with reference predictors."""
import numpy as np
import pytest

import data
import evaluate
import rollout


def room():
    """A 5x5 world: walls all around, one type per side; the eye at the centre of cell (x, z) = (row, column) (2, 2)."""
    w = np.zeros((5, 5), np.uint8)
    w[0, :], w[-1, :], w[:, 0], w[:, -1] = 1, 2, 3, 4
    return w


def poses(yaws, x=2.5, z=2.5):
    """MineRL poses [action, x, y, z, yaw, pitch] (data.py's docstring): y the eye height."""
    return np.array([[0, x, data.EYE, z, yaw, 0] for yaw in yaws], np.float32)


def test_faces_in_a_known_room():
    # facing (-sin yaw, cos yaw): yaw 0 faces +z, the centre column hits cell (row 2, column 4) going +z: side 0;
    # yaw 270 faces +x: (4, 2) going +x, side 2; yaw 180 faces -z: (2, 0), side 1; yaw 90 faces -x: (0, 2), side 3
    frames, face, wall = data.render(room(), poses([0, 270, 180, 90]), 32, faces=True)
    centre = face[:, 15]
    assert centre.tolist() == [(2 * 5 + 4) * 4 + 0, (4 * 5 + 2) * 4 + 2, (2 * 5 + 0) * 4 + 1, (0 * 5 + 2) * 4 + 3]
    assert np.array_equal(frames, data.render(room(), poses([0, 270, 180, 90]), 32))  # the same pixels
    # the wall's pixels, by hand: facing +z the wall is 1.5 cells away; row r sees the wall plane at
    # v = (WALL - EYE) + (r + 0.5 - 16) * 1.5 * 2 tan(35°) / 32 cells below its top, a wall where 0 <= v < 2.5:
    # rows 0..23 (v from -0.05 ... no: v(0) = 2 - 15.5 * 0.0656 = 0.98 >= 0), floor from row 24
    assert wall[0, :, 15].tolist() == [r <= 23 for r in range(32)]
    # every face of a column is a border face of this room
    cells = face // 4
    rows, cols = cells // 5, cells % 5
    assert ((rows == 0) | (rows == 4) | (cols == 0) | (cols == 4)).all()


def test_spin_comes_back_every_36_frames():
    # one turn direction held: 10° a frame, so frame t + 36 shows exactly what frame t showed
    cfg = data.maze_config("tiny", walk="spin")
    world, p, _ = data._plan(cfg, "test", 0)
    assert np.allclose(p[:, [1, 3]], p[0, [1, 3]]) and len(np.unique(np.diff(p[:, 4]) % 360)) == 1
    _, face, _ = data.render(world, p, cfg.size, cfg.fov, faces=True)
    assert np.array_equal(face[:-36], face[36:])
    # a face that leaves the view (70° wide) comes back after 36 - 7 .. 36 frames: last seen that long ago
    seen = [set(r.tolist()) for r in face]
    t, f = 50, face[50, 0 if p[0, 0] == data.LEFT else -1]  # the column where faces enter the view
    last = max(s for s in range(t) if f in seen[s] and f not in seen[s + 1])
    assert 28 <= t - last <= 36


def test_revisit_walk_goes_out_and_back():
    cfg = data.maze_config("toy", walk="revisit", leg=8, density=0.0)  # no obstacles: the legs are exact
    _, p, _ = data._plan(cfg, "test", 0)
    period = 2 * (9 * 8 + 18)
    assert np.allclose(p[period:2 * period, [1, 3]], p[:period, [1, 3]], atol=1e-5)
    # frame 0 is seen after the first forward: 71 more of 1/9 cell each take the walk 8 cells out
    assert np.abs(p[9 * 8 - 1, [1, 3]] - p[0, [1, 3]]).sum() == pytest.approx(71 / 9, abs=1e-4)


def test_reach_matches_the_step_enumeration():
    # how far back the steps that write a generated frame read, at equal tokens (rollout.py's presets)
    expected = {"tiny": {"millivid": (21, 36), "framepack": (21, 21), "fullres": (2, 3)},
                "toy": {"millivid": (85, 148), "framepack": (85, 85), "fullres": (2, 4)}}
    for preset, rows in expected.items():
        T0, start, end = rollout.preset_frames(preset)
        for strategy, (lo, hi) in rows.items():
            steps, clipped = rollout.strategy_steps(rollout.rollout_config(preset, strategy=strategy), T0)
            reach = rollout.knowledge(steps, start, end, [set()] * end, clipped)["reach"]
            assert (min(reach), max(reach)) == (lo, hi), (preset, strategy)


def test_knowledge_by_hand():
    # full-resolution rollout of 4 frames: 2 context + 2 denoised, chunks at 2, 4, 6 for frames [4, 8).
    # Face 100 is in view all the time, face f only in frame f: only 100 can be known, via the chain.
    steps = rollout.fullres_steps(4)
    faces = [{f, 100} for f in range(8)]
    k = rollout.knowledge(steps, 4, 8, faces)
    assert k["known"] == [{100}] * 4 and k["reach"] == [2, 3, 2, 3]
    # face 7 seen in context frame 2 and again in frame 5: frame 5's step reads frames 2, 3; then in
    # frame 7, whose step reads frames 4, 5: known through frame 5, which showed it
    faces[2], faces[5], faces[7] = {2, 7}, {5, 7}, {7}
    assert [k & {7} for k in rollout.knowledge(steps, 4, 8, faces)["known"]] == [set(), {7}, set(), {7}]
    # without frame 5 showing it, frame 7 cannot know it: the chain through frames 4, 5 lost it
    faces[5] = {5, 100}
    assert rollout.knowledge(steps, 4, 8, faces)["known"][3] == set()


def probe_video(preset="spin", i=0):
    cfg = data.maze_config(preset)
    T0, c, n = rollout.preset_frames(preset)
    world, p, _ = data._plan(cfg, "test", i)
    frames, face, wall = data.render(world, p, cfg.size, cfg.fov, faces=True)
    plans = {s: rollout.strategy_steps(rollout.rollout_config(preset, strategy=s), T0)
             for s in ("millivid", "framepack", "fullres")}
    return frames, face, wall, [set(r.tolist()) for r in face], plans, c


def reference(frames, face, wall, known, c):
    """The true world where its face is knowable, a fixed grey everywhere else."""
    out = np.full_like(frames[c:], 128)
    ok = np.array([[f in k for f in row] for k, row in zip(known, face[c:])])[:, None, :] & wall[c:]  # (K, H, W)
    out[ok] = frames[c:][ok]
    return out


def colour(frames, truth, cat):
    """Colour agreement per category over all generated frames, pooled over pixels (NaN-free here)."""
    m = evaluate.probe_metrics(frames, truth, cat, data.PALETTE)
    pixels = [np.array([(c == i).sum() for c in cat]) for i in range(3)]  # per frame
    return [np.nansum(m[f"colour_{c}"] * p) / p.sum() for c, p in zip(("all", "only", "none"), pixels)]


def test_reference_predictors_score_by_category():
    frames, face, wall, seen, plans, c = probe_video()
    cat, swap = evaluate.probe_categories(plans, face, wall, seen, c)
    share = [(cat == k).mean() for k in range(3)]
    assert min(share) > 0.005, share  # the spin asks for memory: every category is populated
    truth = frames[c:]
    known = {s: rollout.knowledge(p[0], c, len(face), seen, p[1])["known"] for s, p in plans.items()}
    m, f = (colour(reference(frames, face, wall, known[s], c), truth, cat) for s in ("millivid", "framepack"))
    assert m[0] == 1 and m[1] == 1 and m[2] == 0      # MilliVid's reach: right on what it can know, grey elsewhere
    assert f[0] == 1 and f[1] == 0 and f[2] == 0      # FramePack's: it cannot know the memory pixels
    # the swap control: the context frames that show no face seen by all come from another world. A
    # reference predictor of MilliVid loses exactly the memory pixels; 'seen by all' is untouched.
    swapped = [set() if t in swap else s for t, s in enumerate(seen)]
    known_swapped = rollout.knowledge(plans["millivid"][0], c, len(face), swapped, plans["millivid"][1])["known"]
    ms = colour(reference(frames, face, wall, known_swapped, c), truth, cat)
    assert ms[0] == 1 and ms[1] == 0 and ms[2] == 0
    common = set(face[c:][(cat == 0).any(1)].tolist())  # the faces of 'seen by all' pixels
    assert swap and max(swap) < c and not any(seen[t] & common for t in swap)


def test_probe_metrics_by_hand():
    # two frames of 1 x 4 pixels: categories [0, 1, 2, -1] and [1, 1, -1, -1]; a wall-coloured truth
    truth = np.tile(data.PALETTE[1], (2, 1, 4, 1))               # (K, H, W, 3) red walls
    frames = truth.copy()
    frames[0, 0, 1] = data.PALETTE[6]                            # frame 0: its 'MilliVid only' pixel is blue
    cat = np.array([[[0, 1, 2, -1]], [[1, 1, -1, -1]]], np.int8)
    m = evaluate.probe_metrics(frames, truth, cat, data.PALETTE)
    assert m["colour_all"][0] == 1 and np.isnan(m["colour_all"][1])  # frame 1 has no 'seen by all' pixel
    assert m["colour_only"].tolist() == [0, 1] and m["colour_none"][0] == 1
    mse = ((data.PALETTE[6].astype(float) - data.PALETTE[1]) / 255) ** 2
    assert m["psnr_only"][0] == pytest.approx(-10 * np.log10(mse.mean()))
    assert m["psnr_only"][1] == evaluate.PSNR_CAP                # identical pixels: capped, not inf


def test_probe_verdict():
    # {row: {metric: (mean over videos, standard error)}}: a MilliVid that recalls, a swap that forgets
    def row(all_, only, none=(0.12, 0.01)):
        return {"colour_all": all_, "colour_only": only, "colour_none": none}
    rows = {"millivid": row((0.8, 0.02), (0.55, 0.03)), "millivid swap": row((0.8, 0.02), (0.12, 0.02)),
            "framepack": row((0.8, 0.02), (0.13, 0.02)), "fullres": row((0.78, 0.02), (0.11, 0.02)),
            "ground-truth latents": row((0.9, 0.01), (0.9, 0.01)), "random latents": row((0.3, 0.02), (0.3, 0.02))}
    assert evaluate.probe_verdict(rows, 0.75).startswith("Confirmed")
    rows["millivid swap"] = rows["millivid"]  # the swap does not move it: not confirmed
    assert evaluate.probe_verdict(rows, 0.75).startswith("Not confirmed")
    rows["framepack"] = row((0.3, 0.02), (0.1, 0.02))  # below the gate on what everyone sees: not measurable
    assert "framepack" in evaluate.probe_verdict(rows, 0.75) and evaluate.probe_verdict(rows, 0.75).startswith(
        "Not measurable")


def test_toy_revisit_split_asks_for_memory_only_millivid_can_reach():
    # the toy probe (python train.py --stage all --preset toy --data.walk=revisit): out 8 cells and back,
    # a view comes back after ~100 frames, inside MilliVid's toy reach (85-148), beyond FramePack's (85)
    cfg = data.maze_config("toy", walk="revisit", leg=8)
    T0, c, n = rollout.preset_frames("toy")
    world, p, _ = data._plan(cfg, "test", 0)
    frames, face, wall = data.render(world, p, cfg.size, cfg.fov, faces=True)
    plans = {s: rollout.strategy_steps(rollout.rollout_config("toy", strategy=s), T0)
             for s in ("millivid", "framepack", "fullres")}
    cat, swap = evaluate.probe_categories(plans, face, wall, [set(r.tolist()) for r in face], c)
    share = [(cat == k).sum() / wall[c:].sum() for k in range(3)]
    assert share[1] > 0.1 and share[0] > 0.05, share


def test_categories_without_millivid_or_without_baselines():
    # no MilliVid among the compared models: nothing is 'MilliVid only'; MilliVid alone: nothing either
    frames, face, wall, seen, plans, c = probe_video()
    for compared in ({"framepack", "fullres"}, {"millivid"}):
        cat, _ = evaluate.probe_categories({s: plans[s] for s in compared}, face, wall, seen, c)
        assert not (cat == 1).any() and (cat == 0).any() and (cat == 2).any(), compared
