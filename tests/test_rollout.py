"""rollout.py against worked examples, the paper's figures and the invariants that make the bookkeeping
correct (paper §3.2, Fig. 2, Fig. 10, Fig. 11, App. A.2-A.3)."""
import os
import re
import subprocess
import sys
from fractions import Fraction

from dataclasses import replace

import numpy as np
import pytest

import rollout
from rollout import CONTEXT, DENOISED, UNSEEN

# the 3-level worked example (Fig. 10's grid with W = 1, 4, 16), cell for cell, written by hand from §3.2
EXAMPLE = os.path.join(os.path.dirname(__file__), "fixtures", "rollout-example-3-levels.txt")


def tokens(step, T0, dense=False):
    return int(rollout.level_tokens(step.selection, T0, dense).sum())


def parse_example(text):
    """The example file -> (chunk frames, [(group, selection (L, N), tokens)])."""
    lines = text.splitlines()
    N = int(lines[0].split()[2])
    steps, i = [], 1
    while i < len(lines):
        group = int(lines[i].split()[-1])
        rows = [line.split()[1] for line in lines[i + 1:i + 4]]  # L2, L1, L0
        sel = np.array([[".CD".index(ch) for ch in row] for row in rows[::-1]])
        steps.append((group, sel, int(lines[i + 4].split()[1])))
        i += 5
    return N, steps


# ---------------------------------------------------------------------------------------------------
# Worked examples and the paper's numbers


def test_three_level_example_cell_for_cell():
    with open(EXAMPLE) as f:
        text = f.read()
    N, expected = parse_example(text)
    steps = rollout.millivid_steps([1, 4, 16], 256, 256)
    assert N == 37 and len(steps) == len(expected) == 21
    for i, (step, (group, sel, tok)) in enumerate(zip(steps, expected)):
        assert step.group == group, f"step {i}"
        np.testing.assert_array_equal(step.selection, sel, err_msg=f"step {i}")
        assert tokens(step, 256) == tok == 1024
    # Fig. 2: a long coarse sequence, a medium one, then a single fine frame
    assert [s.group for s in steps[:4]] == [2, 1, 0, 0]
    assert [(s.selection == DENOISED).sum() for s in steps[:3]] == [16, 4, 1]


def test_show_prints_the_example_file_byte_for_byte(capsys):
    with open(EXAMPLE) as f:
        expected = f.read()
    rollout.main(["show", "millivid", "--frames-per-level=1,4,16", "--extra-budget", "256", "--tokens", "256"])
    assert capsys.readouterr().out == expected
    # and as a script, the way readers run it
    out = subprocess.run([sys.executable, "rollout.py", "show", "millivid", "--frames_per_level=1,4,16",
                          "--extra_budget=256", "--tokens", "256"], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(rollout.__file__)).stdout
    assert out == expected


@pytest.mark.parametrize("W, extra, T0, N, num_steps, new, tok", [
    ([1, 4, 16], 256, 256, 37, 21, 16, 1024),
    ([3, 12, 48, 192], 768, 256, 447, 85, 192, 3840),  # paper main
    ([1, 4, 16, 64], 256, 256, 149, 85, 64, 1280),     # paper ablation (S = 1280)
    ([1, 4, 16, 64], 64, 64, 149, 85, 64, 320),        # toy
    ([1, 4, 16], 16, 16, 37, 21, 16, 64),              # tiny
])
def test_spec_figures_table(W, extra, T0, N, num_steps, new, tok):
    steps = rollout.millivid_steps(W, extra, T0)
    f = rollout.figures(steps, T0, start=N - W[-1], end=N - W[-1] + 3 * W[-1])
    assert (f["chunk_frames"], f["steps_per_chunk"], f["new_frames"], f["tokens"]) == (N, num_steps, new, tok)
    assert f["first_denoised"] == N - W[-1] and f["equal_tokens"]
    assert len(steps) == num_steps and all(tokens(s, T0) == tok for s in steps)


def test_paper_step_zero():
    """Spec: L3 context 0-191, denoised 255-446; L2 context 192-239; L1 240-251; L0 252-254."""
    step = rollout.millivid_steps([3, 12, 48, 192], 768, 256)[0]
    sel = step.selection
    assert step.group == 3 and sel.shape == (4, 447)
    for level, ctx, den in [(3, range(0, 192), range(255, 447)), (2, range(192, 240), []),
                            (1, range(240, 252), []), (0, range(252, 255), [])]:
        np.testing.assert_array_equal(np.flatnonzero(sel[level] == CONTEXT), list(ctx))
        np.testing.assert_array_equal(np.flatnonzero(sel[level] == DENOISED), list(den))
    # §4 Models: up to 192 frames denoised at once with up to 255 frames of context
    steps = rollout.millivid_steps([3, 12, 48, 192], 768, 256)
    assert max((s.selection == DENOISED).sum() for s in steps) == 192
    assert rollout.first_denoised(steps) == 255


def test_paper_schedule_and_cost():
    steps = rollout.millivid_steps([3, 12, 48, 192], 768, 256)
    chunk_starts = rollout.chunk_starts(steps, 256, 1024)
    assert chunk_starts == [1, 193, 385, 577] and chunk_starts[-1] + 447 == 1024
    f = rollout.figures(steps, 256, 256, 1024)
    assert f["rollout_steps"] == 340 and f["nfe"] == 340 * 50
    fp = rollout.figures(rollout.framepack_steps(3, [3, 12, 48, 192]), 256, 256, 1024, dense=True)
    assert fp["tokens"] == 3840 and fp["rollout_steps"] == 256
    assert Fraction(f["rollout_steps"], fp["rollout_steps"]) == Fraction(85, 64)  # App. A.3: ~33% more
    full = rollout.figures(rollout.fullres_steps(14), 256, 256, 1024)
    assert full["tokens"] == 3584 and full["first_denoised"] == 7 and full["rollout_steps"] == 110  # ceil(768/7)


def test_framepack_example():
    """Spec: d = 3, K = [3, 12, 48, 192]: chunk 258, 4 x 768 + 3 x 340 = 4092 tokens hierarchical,
    3840 dense (the paper's baseline: 3072 context + 3 x 256)."""
    (step,) = rollout.framepack_steps(3, [3, 12, 48, 192])
    sel = step.selection
    assert sel.shape == (4, 258) and step.group is None
    for level, (a, b) in enumerate([(252, 255), (240, 252), (192, 240), (0, 192)]):  # coarsest oldest
        np.testing.assert_array_equal(np.flatnonzero(sel[level] == CONTEXT), np.arange(a, b))
    assert (sel[:, 255:] == DENOISED).all()
    assert tokens(step, 256) == 4092
    np.testing.assert_array_equal(rollout.level_tokens(sel, 256, dense=True), [6 * 256, 768, 768, 768])


def test_fullres_rollout():
    for n, T0, ctx, tok in [(14, 256, 7, 3584), (5, 64, 2, 320), (4, 16, 2, 64)]:  # paper, toy, tiny
        (step,) = rollout.fullres_steps(n)
        np.testing.assert_array_equal(step.selection[0], [CONTEXT] * ctx + [DENOISED] * (n - ctx))
        assert tokens(step, T0) == tok


@pytest.mark.parametrize("preset, T0, tok, N, D0, new", [("toy", 64, 320, 149, 85, 64), ("tiny", 16, 64, 37, 21, 16)])
def test_toy_and_tiny_budgets(preset, T0, tok, N, D0, new):
    """Within a preset MilliVid, dense FramePack and full-res rollout have equal budgets."""
    (T0_, start, end), cfg = rollout.preset_frames(preset), rollout.rollout_config(preset)
    assert T0_ == T0
    steps, _ = rollout.strategy_steps(cfg, T0)
    f = rollout.figures(steps, T0, start, end)
    assert (f["tokens"], f["chunk_frames"], f["first_denoised"], f["new_frames"]) == (tok, N, D0, new)
    assert f["equal_tokens"] and f["rollout_steps"] == (end - start) // new * len(steps)
    dense = rollout.strategy_steps(replace(cfg, strategy="framepack"), T0)[0]
    assert tokens(dense[0], T0, dense=True) == tok
    assert tokens(rollout.strategy_steps(replace(cfg, strategy="fullres"), T0)[0][0], T0) == tok


def test_rollout_upscale():
    """Widths B 4^l, the top 9/8 of B 4^(L-1), every step 9/8 B T_0 tokens, two top steps."""
    steps = rollout.rollout_upscale_steps(2, 4)
    assert steps[0].selection.shape == (4, 216) and rollout.first_denoised(steps) == 72
    assert [sum(s.group == l for s in steps) for l in range(4)] == [144, 36, 9, 2]
    assert {tokens(s, 256) for s in steps} == {9 * 2 * 256 // 8}
    s = steps[2]  # the first level-2 step: its 32-frame window straddles D0, level-3 context on its new half
    np.testing.assert_array_equal(np.flatnonzero(s.selection[2] == CONTEXT), np.arange(56, 72))
    np.testing.assert_array_equal(np.flatnonzero(s.selection[2] == DENOISED), np.arange(72, 88))
    np.testing.assert_array_equal(np.flatnonzero(s.selection[3] == CONTEXT), np.arange(72, 88))


# ---------------------------------------------------------------------------------------------------
# Invariants over many configurations


def millivid_configs():
    for L in range(2, 6):
        for m in (1, 2, 3):
            for extra in (0, 1, 3):
                yield [m * 4**l for l in range(L)], extra * 4**L, 4**L  # T_0 = 4^L: T_(L-1) = 4
    yield [1, 2, 4], 64, 64  # a 2x multiplier between levels: still exact, budgets not equal
    yield [2, 6, 18], 0, 16


def replay(steps, start, end, num_clipped=0):
    """Run the schedule over a video with ground truth before `start`: no step may read a cell as
    CONTEXT before the ground truth or an earlier step produced it, and no cell is rewritten after
    it has been read (what prevents the stop/go inconsistency). Returns the produced cells."""
    chunk_starts = rollout.chunk_starts(steps, start, end, num_clipped)
    L, N = steps[0].selection.shape
    buffer_end = chunk_starts[-1] + N
    assert buffer_end >= end and chunk_starts[0] == start - rollout.first_denoised(steps)
    produced = np.zeros((L, buffer_end), bool)
    produced[:, :start] = True
    read = np.zeros_like(produced)
    for c in chunk_starts:
        for i, step in enumerate(steps):
            window = np.s_[:, c:c + N]
            ctx, den = step.selection == CONTEXT, step.selection == DENOISED
            assert produced[window][ctx].all(), f"chunk at {c}, step {i} reads unproduced context"
            assert not read[window][den].any(), f"chunk at {c}, step {i} rewrites a cell already read"
            read[window] |= ctx
            produced[window] |= den
    return produced


@pytest.mark.parametrize("W, extra, T0", list(millivid_configs()))
def test_millivid_invariants(W, extra, T0):
    steps = rollout.millivid_steps(W, extra, T0)
    L, N = steps[0].selection.shape
    T = [T0 // 4**l for l in range(L)]
    E = [extra // t for t in T]
    assert N == sum(W) + E[-1]
    assert len(steps) == sum(W[-1] // w for w in W)  # 1 + 4 + 16 + ...
    # every step shows W_l frames per level plus E_T extra at its target: sum W_l T_l + E_T T_T tokens
    for s in steps:
        shown = (s.selection != UNSEEN).sum(1)
        np.testing.assert_array_equal(shown, np.array(W) + np.eye(L, dtype=int)[s.group] * E[s.group])
        assert tokens(s, T0) == sum(w * t for w, t in zip(W, T)) + E[s.group] * T[s.group]
    if all(W[l] * T[l] == W[0] * T[0] for l in range(L)) and extra % T0 == 0:  # equal budgets
        assert len({tokens(s, T0) for s in steps}) == 1
    # the new region [N - W_(L-1), N) is denoised exactly once at every level, nothing else ever is
    times = sum((s.selection == DENOISED).astype(int) for s in steps)
    assert (times[:, N - W[-1]:] == 1).all() and (times[:, :N - W[-1]] == 0).all()
    # each target level denoises its W_l frames, left to right
    for l in range(L):
        firsts = [np.flatnonzero(s.selection[l] == DENOISED) for s in steps if s.group == l]
        assert all(len(f) == W[l] and (np.diff(f) == 1).all() for f in firsts)
        assert [f[0] for f in firsts] == list(range(N - W[-1], N, W[l]))
    # probabilities: sum 1, each level gets 1/L, split evenly
    p = rollout.step_probabilities(steps)
    assert abs(p.sum() - 1) < 1e-12
    for l in range(L):
        share = p[[s.group == l for s in steps]]
        assert abs(share.sum() - 1 / L) < 1e-12 and np.ptp(share) == 0
    # a long video, with an overshooting last chunk
    D0 = N - W[-1]
    produced = replay(steps, D0 + 1, D0 + 1 + 2 * W[-1] + 1)
    assert produced[:, :D0 + 2 + 2 * W[-1]].all()


def other_strategies():
    yield "framepack d=3", rollout.framepack_steps(3, [3, 12, 48, 192]), 0
    yield "framepack d=1 3 levels", rollout.framepack_steps(1, [1, 4, 16]), 0
    yield "framepack K_0=0", rollout.framepack_steps(2, [0, 2, 8]), 0
    for D, K in [([1, 4, 16], [1, 4, 16]), ([2, 3, 5], [1, 4, 16]), ([3, 12, 48, 192], [3, 12, 48, 192]),
                 ([1, 0, 7], [2, 2, 2])]:
        yield f"mirrored D={D} K={K}", rollout.framepack_mirrored_steps(D, K), sum(D) - D[0]
    for n in (2, 4, 5, 14):
        yield f"fullres n={n}", rollout.fullres_steps(n), 0
    for B, L in [(2, 4), (2, 3), (4, 2), (2, 5)]:
        yield f"upscale B={B} L={L}", rollout.rollout_upscale_steps(B, L), 0


OTHERS = list(other_strategies())


@pytest.mark.parametrize("name, steps, clipped", OTHERS, ids=[o[0] for o in OTHERS])
def test_other_strategies_replay(name, steps, clipped):
    L, N = steps[0].selection.shape
    D0 = rollout.first_denoised(steps)
    w = N - D0 - clipped
    start, end = D0 + 3, D0 + 3 + 3 * w + (w > 1)  # the last chunk overshoots when w > 1
    produced = replay(steps, start, end, clipped)
    finished = produced[:, :end] if clipped == 0 else produced[:1, :end]  # mirrored: level 0 is what counts
    assert finished.all(), name
    assert len({tokens(s, 4 ** L) for s in steps}) == 1  # one token count for every step (no padding)
    p = rollout.step_probabilities(steps)
    groups = {s.group for s in steps}
    assert abs(p.sum() - 1) < 1e-12
    for g in groups:
        assert abs(p[[s.group == g for s in steps]].sum() - 1 / len(groups)) < 1e-12


def test_probabilities_of_the_paper_config():
    """Spec: 4 levels -> 0.25 for the single coarsest step, 0.25/64 for each finest step."""
    steps = rollout.millivid_steps([3, 12, 48, 192], 768, 256)
    p = rollout.step_probabilities(steps)
    assert p[0] == 0.25 and steps[0].group == 3
    assert np.allclose(p[[s.group == 0 for s in steps]], 0.25 / 64)
    assert rollout.step_probabilities(rollout.fullres_steps(14)).tolist() == [1.0]


def test_chunk_sliding_and_errors():
    steps = rollout.millivid_steps([1, 4, 16, 64], 64, 64)  # toy: N 149, D0 85, 64 new frames
    assert rollout.chunk_starts(steps, 128, 384) == [43, 107, 171, 235]  # the last ends at 235 + 149 = 384
    assert rollout.chunk_starts(steps, 128, 390) == [43, 107, 171, 235, 299]  # overshoots 390: ends at 448
    assert rollout.chunk_starts(steps, 85, 86) == [0]
    with pytest.raises(ValueError, match="start=84"):
        rollout.chunk_starts(steps, 84, 300)
    mirrored = rollout.framepack_mirrored_steps([1, 4, 16], [1, 4, 16])  # N 42, D0 21, 1 finished frame
    assert rollout.chunk_starts(mirrored, 32, 35, num_clipped=20) == [11, 12, 13]
    assert rollout.figures(mirrored, 16, 32, 35, num_clipped=20)["buffer_end"] == 55
    with pytest.raises(ValueError, match="num_clipped"):
        rollout.chunk_starts(mirrored, 32, 35, num_clipped=21)


def test_cost_ratio_is_85_over_64_at_equal_budget():
    """App. A.3: (1 + 4 + 16 + 64) / 64 rollout steps per frame of FramePack's 1 / d, for any multiplier."""
    for m, T0 in [(1, 64), (1, 256), (3, 256), (2, 64)]:
        W = [m * 4**l for l in range(4)]
        mv = rollout.figures(rollout.millivid_steps(W, m * T0, T0), T0, 3 * 64 * m, 3 * 64 * m + 8 * 64 * m)
        fp = rollout.figures(rollout.framepack_steps(m, W), T0, 3 * 64 * m, 3 * 64 * m + 8 * 64 * m, dense=True)
        assert mv["tokens"] == fp["tokens"] == 5 * m * T0
        assert Fraction(mv["rollout_steps"], fp["rollout_steps"]) == Fraction(85, 64)


# ---------------------------------------------------------------------------------------------------
# Token layout


def test_step_layout_order_and_counts():
    grids = [(4, 4), (2, 2), (1, 1)]  # tiny preset: 16 / 4 / 1 tokens per frame
    for step in rollout.millivid_steps([1, 4, 16], 16, 16):
        lay = rollout.step_layout(step.selection, grids)
        assert set(lay) == {"frame", "level", "row", "col", "role"}
        assert all(v.dtype == np.int64 and v.shape == (64,) for v in lay.values())
        width = np.array([w for _, w in grids])[lay["level"]]
        # level-major, then frame ascending, then row-major: the sort key never decreases
        key = (lay["level"] * 1000 + lay["frame"]) * 100 + lay["row"] * width + lay["col"]
        assert (np.diff(key) > 0).all()
        np.testing.assert_array_equal(lay["role"], step.selection[lay["level"], lay["frame"]])
        for l, (h, w) in enumerate(grids):
            assert (lay["level"] == l).sum() == (step.selection[l] != UNSEEN).sum() * h * w
    lay = rollout.step_layout(rollout.fullres_steps(2)[0].selection, [(1, 2), (1, 1)])  # by hand
    assert {k: v.tolist() for k, v in lay.items()} == dict(
        frame=[0, 0, 1, 1], level=[0, 0, 0, 0], row=[0, 0, 0, 0], col=[0, 1, 0, 1], role=[1, 1, 2, 2])
    with pytest.raises(ValueError, match="grids"):
        rollout.step_layout(step.selection, grids[:2])


def test_dense_layout_counts_raw_level0_tokens():
    (step,) = rollout.framepack_steps(3, [3, 12, 48, 192])
    lay = rollout.step_layout(step.selection, [(16, 16), (8, 8), (4, 4), (2, 2)], dense=True)
    assert len(lay["frame"]) == 258 * 256  # every frame once, as raw level-0 tokens
    # groups: 6 frames at k = 0 (3 context + the 3 new ones), then 12, 48, 192; new frames only at k = 0
    np.testing.assert_array_equal(np.bincount(lay["level"]) // 256, [6, 12, 48, 192])
    assert (lay["level"][lay["role"] == DENOISED] == 0).all() and (lay["role"] == DENOISED).sum() == 3 * 256
    assert lay["row"].max() == 15 and lay["col"].max() == 15
    assert (np.bincount(lay["frame"]) == 256).all()
    # what the dense model sees after packing group k with 2^k x 2^k: 3840 tokens
    assert sum(np.bincount(lay["level"]) // 4 ** np.arange(4)) == 3840 == tokens(step, 256, dense=True)


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cost_command_prints_the_table(capsys):
    rollout.main(["cost"])
    out = capsys.readouterr().out
    assert "340/256 = 85/64" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert rows["millivid"] == ["3840", "447", "255", "192", "85", "4", "340", "17000"]
    assert rows["framepack"] == ["3840", "258", "255", "3", "1", "256", "256", "12800"]
    assert rows["fullres"] == ["3584", "14", "7", "7", "1", "110", "110", "5500"]
    rollout.main(["cost", "--preset", "toy"])
    out = capsys.readouterr().out
    assert "340/256 = 85/64" in out and out.splitlines()[2].split()[1:4] == ["320", "149", "85"]


@pytest.mark.parametrize("strategy, num_steps, tok", [("framepack", 1, 69), ("framepack-mirrored", 1, 101),
                                                      ("fullres", 1, 64), ("upscale", 47, 36), ("millivid", 21, 64)])
def test_show_other_strategies(strategy, num_steps, tok, capsys, tmp_path):
    png = tmp_path / "steps.png"
    rollout.main(["show", strategy, "--preset", "tiny", "--figures", "--image", str(png)])
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f"steps {num_steps}")
    assert out.count("  tokens ") == num_steps and f"  tokens {tok}\n" in out
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] >= 360
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="frames_per_level"):
        rollout.millivid_steps([2, 3], 0, 16)
    with pytest.raises(ValueError, match="tokens_per_frame"):
        rollout.millivid_steps([1, 4, 16], 0, 100)
    with pytest.raises(ValueError, match="denoised_frames_per_level"):
        rollout.framepack_mirrored_steps([1, 4], [1, 4, 16])
    with pytest.raises(ValueError, match="base_frames"):
        rollout.rollout_upscale_steps(1, 3)
    with pytest.raises(SystemExit):
        rollout.main(["show", "millivid", "--frames-per-level=1,3,5"])
    with pytest.raises(SystemExit):  # strict: an unknown setting is an error, not ignored
        rollout.main(["show", "millivid", "--frames-per-levle=1,4,16"])
    with pytest.raises(SystemExit, match="does not exist"):
        rollout.main(["show", "fullres", "--image", "/nonexistent/folder/x.png"])


def test_bench_names_the_hardware_and_prints_training_and_sampling_figures(capsys):
    rollout.main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "1", "--batch", "2"])
    out = capsys.readouterr().out
    assert f"device cpu ({rollout.diffusion.cpu_name()}" in out and "batch 2 x 64 tokens" in out
    assert re.search(r"train  VideoDiT +[\d,]+ tokens/s", out) and "train  nn.TransformerEncoder" in out
    assert re.search(r"sample VideoDiT +[\d,.]+ network evaluations/s of 2 sequences, [\d,.]+ frames/s", out)
