"""evaluate.py against known numbers: metric identities and closed forms, horizon buckets, the
random-latents pairing, and the whole protocol + report on a small synthetic test set."""
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate as ev

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- PSNR


def test_psnr_identical_frames_are_capped_at_100_db():
    x = RNG.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert ev.PSNR_CAP == 100.0
    np.testing.assert_allclose(ev.psnr(x, x), [100.0] * 3, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ev.psnr(x / 255.0, x / 255.0), [100.0] * 3, rtol=0, atol=1e-9)


def test_psnr_of_known_error_levels():
    truth = np.full((1, 8, 8, 3), 100, np.uint8)
    # constant offset of 10 grey levels: MSE = (10/255)^2 -> PSNR = 20 log10(25.5)
    np.testing.assert_allclose(ev.psnr(truth + 10, truth), [20 * math.log10(25.5)], atol=1e-9)
    # ±d noise (random signs), uniform in magnitude: MSE = d^2 exactly -> PSNR = -20 log10(d)
    x = np.full((2, 16, 16, 3), 0.5)
    for d in (0.1, 0.01):
        y = x + d * RNG.choice([-1.0, 1.0], x.shape)
        np.testing.assert_allclose(ev.psnr(y, x), [-20 * math.log10(d)] * 2, atol=1e-6)


def test_uint8_and_float_frames_agree_and_layout_is_checked():
    x, y = (RNG.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8) for _ in range(2))
    np.testing.assert_allclose(ev.psnr(x, y), ev.psnr(x / 255.0, torch.from_numpy(y / 255.0)), atol=1e-6)
    np.testing.assert_allclose(ev.ssim(x, y), ev.ssim(x / 255.0, y / 255.0), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        ev.psnr(np.zeros((2, 3, 16, 16)), np.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match="differ in shape"):
        ev.psnr(x, y[:, :8])


# ----------------------------------------------------------------------------- SSIM


def test_ssim_identical_frames_is_one():
    x = RNG.random((3, 24, 24, 3))
    np.testing.assert_allclose(ev.ssim(x, x), [1.0] * 3, atol=1e-6)


def test_ssim_of_constant_images_matches_closed_form():
    # constant frames: μx = a, μy = b, σ = 0 -> SSIM = (2ab + C1) / (a² + b² + C1)
    C1 = 0.01**2
    for a, b in [(0.5, 0.6), (0.2, 0.9), (0.0, 1.0)]:
        x, y = np.full((1, 16, 16, 3), a), np.full((1, 16, 16, 3), b)
        np.testing.assert_allclose(ev.ssim(x, y), [(2 * a * b + C1) / (a * a + b * b + C1)], atol=1e-6)


def gaussian_window(size=11, sigma=1.5):  # written out here, independent of evaluate.py's
    i = np.arange(size) - (size - 1) / 2
    g = np.exp(-i**2 / (2 * sigma**2))
    return g / g.sum()


def test_ssim_of_a_constant_offset_matches_closed_form():
    """x = a ± d checkerboard, y = x + c. With separable weights the local mean at output (p, q) is
    μ = a + d (-1)^(p+q) s², s = Σ_i g_i (-1)^i; σx² = σy² = σxy (so the structure term is 1) and
    SSIM = mean over both parities of (2μ(μ+c) + C1) / (μ² + (μ+c)² + C1)."""
    a, d, c, C1 = 0.5, 0.2, 0.1, 0.01**2
    i, j = np.mgrid[:20, :20]
    x = np.repeat((a + d * (-1.0) ** (i + j))[None, :, :, None], 3, axis=3)  # (1, 20, 20, 3)
    g = gaussian_window()
    s2 = (g * (-1.0) ** np.arange(11)).sum() ** 2
    f = [(2 * mu * (mu + c) + C1) / (mu**2 + (mu + c) ** 2 + C1) for mu in (a + d * s2, a - d * s2)]
    np.testing.assert_allclose(ev.ssim(x + c, x), [np.mean(f)], atol=1e-9)


def test_ssim_matches_direct_window_computation():
    """Brute force in float64: every 11x11 window, weights w_ij = g_i g_j, per channel, averaged."""
    x, y = RNG.random((1, 14, 13, 3)), RNG.random((1, 14, 13, 3))
    y = 0.6 * x + 0.4 * y  # correlated, so every term of SSIM matters
    g = gaussian_window()
    w = np.outer(g, g)
    C1, C2, vals = 0.01**2, 0.03**2, []
    for ch in range(3):
        for i in range(14 - 10):
            for j in range(13 - 10):
                a, b = x[0, i:i + 11, j:j + 11, ch], y[0, i:i + 11, j:j + 11, ch]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb, cab = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + C1) * (2 * cab + C2) / ((ma**2 + mb**2 + C1) * (va + vb + C2)))
    np.testing.assert_allclose(ev.ssim(x, y), [np.mean(vals)], atol=1e-5)
    with pytest.raises(ValueError, match="window"):
        ev.ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lpips_random():
    import lpips
    return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()


def test_lpips_is_zero_for_identical_frames(lpips_random):
    x, y = RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(ev.lpips_distance(lpips_random, x, x), [0.0, 0.0], atol=1e-7)
    assert (ev.lpips_distance(lpips_random, x, y) > 1e-4).all()


def test_lpips_without_weights_says_which_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    net, why = ev.tokenizer.lpips_net("alex")  # the one weight lookup, shared with the autoencoder's loss
    assert net is None
    assert "unavailable" in why and "alexnet-owt-7be5be79.pth" in why
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "alexnet-owt-7be5be79.pth") in why
    assert not os.path.exists(os.path.join(tmp_path, "hub", "checkpoints"))  # nothing was downloaded


# ----------------------------------------------------------------------------- maze metric

PALETTE = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [90, 90, 90], [230, 230, 230]], np.uint8)


def test_palette_classes_are_shading_invariant_and_merge_same_chromaticity():
    red, green, blue, grey, white = PALETTE.astype(float)
    frame = np.stack([red * 0.4, green * 0.7, blue, white * 0.5, grey, np.zeros(3)])[None, None]  # (1, 1, 6, 3)
    cls = ev.palette_classes(frame.astype(np.uint8), PALETTE)[0, 0].tolist()
    assert cls == [0, 1, 2, 3, 3, -1]  # grey and white are one class; black pixels are "dark"


def test_palette_agreement_on_hand_made_frames():
    red, green, blue = PALETTE[:3]
    a = np.zeros((2, 4, 8, 3), np.uint8)
    b = np.zeros((2, 4, 8, 3), np.uint8)
    a[0, :, :4], a[0, :, 4:] = red // 2, green       # frame 0: left half dim red, right half green
    b[0, :, :4], b[0, :, 4:] = red, blue             # ... vs full red and blue: half agrees
    a[1], b[1] = green, (green * 0.3).astype(np.uint8)  # frame 1: the same wall, darker: all agree
    b[1, 0, 0] = red                                   # ... but for one pixel of 32
    np.testing.assert_allclose(ev.palette_agreement(a, b, PALETTE), [0.5, 31 / 32])


def test_maze_metric_on_rendered_maze_frames():
    """With data.py's renderer and PALETTE: a room walled with type w shows only w, floor and ceiling,
    through every texture and shade, and darkening a frame (distance shading) changes no class."""
    import data
    poses = np.zeros((8, 6), np.float32)
    poses[:, [1, 3]], poses[:, 4] = 3.3, np.arange(8) * 45.0  # x, z in the room; yaw all round
    for w in range(1, 9):
        world = np.full((7, 7), w, np.int64)
        world[1:-1, 1:-1] = 0
        frames = data.render(world, poses, 32)
        cls = ev.palette_classes(frames, data.PALETTE).numpy()
        assert set(np.unique(cls)) == {0, w, len(data.PALETTE) - 1}, w
        np.testing.assert_allclose(ev.palette_agreement((frames * 0.6).astype(np.uint8), frames, data.PALETTE), 1.0)


# ----------------------------------------------------------------------------- buckets, pairing


def test_horizon_buckets_paper_and_scaled():
    assert ev.horizon_buckets(768) == [(1, 64), (65, 256), (257, 768)]
    assert ev.horizon_buckets(768, (64, 256, 768)) == [(1, 64), (65, 256), (257, 768)]
    assert ev.horizon_buckets(256) == [(1, 21), (22, 85), (86, 256)]  # toy preset
    assert ev.horizon_buckets(64) == [(1, 5), (6, 21), (22, 64)]      # tiny preset
    for preset in ("paper", "toy", "tiny"):
        cfg = ev.eval_config(preset)
        assert ev.horizon_buckets(cfg.total - cfg.context) == ev.horizon_buckets(cfg.total - cfg.context, cfg.buckets)
    with pytest.raises(ValueError, match="buckets"):
        ev.horizon_buckets(100, (64, 256, 768))


def test_bucket_means_average_the_per_offset_curve():
    per_frame = np.array([[1.0, 2, 3, 4, 5, 6], [3.0, 4, 5, 6, 7, 8]])  # curve 2, 3, 4, 5, 6, 7
    assert ev.bucket_means(per_frame, ev.horizon_buckets(6, (1, 3, 6))) == [2.0, 3.5, 6.0]


def test_derangement_has_no_fixed_points_and_is_deterministic():
    for n in (2, 3, 10, 1000):
        p = ev.derangement(n, seed=7)
        assert sorted(p) == list(range(n)) and (p != np.arange(n)).all()
        assert (p == ev.derangement(n, seed=7)).all()
    assert (ev.derangement(50, 0) != ev.derangement(50, 1)).any()
    with pytest.raises(ValueError, match="at least 2"):
        ev.derangement(1)


def test_eval_config_presets():
    paper, toy, tiny = (ev.eval_config(p) for p in ("paper", "toy", "tiny"))
    assert (paper.context, paper.total, paper.sampling_steps, paper.cfg_scale,
            paper.batch_size, paper.num_videos) == (256, 1024, 50, 1.0, 8, 1000)
    assert (toy.context, toy.total) == (128, 384) and (tiny.context, tiny.total) == (32, 96)
    for cfg, ends in ((paper, (64, 256, 768)), (toy, (21, 85, 256)), (tiny, (5, 21, 64))):  # Table 1's buckets
        assert [last for _, last in ev.horizon_buckets(cfg.total - cfg.context, cfg.buckets)] == list(ends)
    import data  # the split is stated once, in data.py's presets
    assert all((ev.eval_config(p).context, ev.eval_config(p).total) ==
               (data.maze_config(p).context, data.maze_config(p).frames) for p in ("paper", "toy", "tiny"))
    with pytest.raises(ValueError, match="preset"):
        ev.eval_config("huge")
    with pytest.raises(ValueError, match="EvalConfig: unknown key 'num_video'"):
        ev.eval_config("tiny", num_video=3)


# ----------------------------------------------------------------------------- protocol + report

S, F, C = 32, 24, 8  # frame side, frames per video, context


def fake_video(i):
    """A 'maze' video: palette-coloured vertical stripes scrolling by one pixel per frame."""
    # (F, S) stripe colour per column; videos are shifted by 7i pixels, so no two look alike
    cols = (np.arange(S)[None, :] + np.arange(F)[:, None] + 7 * i) // 4 % len(PALETTE)
    frames = np.repeat(PALETTE[cols][:, None], S, axis=1)  # (F, S, S, 3)
    latents = [frames[:, ::2**l, ::2**l].reshape(F, -1, 3).astype(np.float16) / 255 for l in range(2)]
    poses = np.zeros((F, 6), np.float32)
    return ev.Video(frames, latents, np.arange(F) % 3, poses, world=i)


def fake_decode(z, level):
    """'Latents' are the pixels of a frame subsampled 2^level: (n, T_l, 3) -> (n, 3, h, w)."""
    h = int(math.isqrt(z.shape[1]))
    return z.float().reshape(len(z), h, h, 3).permute(0, 3, 1, 2)


def test_protocol_and_report_write_every_output(tmp_path, lpips_random):
    keys = [f"000/{i:03d}" for i in range(5)]
    videos = {k: fake_video(i) for i, k in enumerate(keys)}
    cfg = ev.eval_config("tiny", context=C, total=F, buckets=(1, 5, 16), batch_size=2, num_samples=2)
    batches = iter([keys[i:i + 2] for i in range(0, 5, 2)])

    def oracle(latents, actions, seed=0):  # returns the true latents of its batch: checks the bookkeeping end to end
        assert all((z[:, C:] == 0).all() for z in latents), "frames after the context must be hidden"
        assert actions.shape == (len(latents[0]), F) and actions.dtype == torch.long
        ks = next(batches)
        return [torch.stack([torch.from_numpy(videos[k].latents[l].astype(np.float32)) for k in ks]) for l in range(2)]

    def hold(latents, actions, seed=0):  # repeats the last context frame; overshooting past F frames is allowed
        return [latents[0][:, C - 1:C].expand(-1, F + 3, -1, -1)]

    calls = []

    def draw_map(world, poses, split, size):
        calls.append((world, len(poses), split, size))
        return np.full((size, size, 3), 128, np.uint8)

    loaded = []

    def load(key):
        loaded.append(key)
        return videos[key]

    models = [ev.Model("millivid", oracle, 10, 500), ev.Model("hold", hold, 16, 800)]
    res = ev.evaluate_videos(cfg, keys, load, fake_decode, models, PALETTE, lpips_random, draw_map,
                             partner_latents=lambda k: videos[k].latents[0][C:F])
    assert loaded == keys  # each video read once: the random-latents row reads only its partner's latents
    assert [r.name for r in res.rows] == ["millivid", "hold", "ground-truth latents", "random latents"]
    by = {r.name: r for r in res.rows}
    assert set(by["hold"].per_frame) == {"psnr", "ssim", "lpips", "maze"}
    assert by["hold"].per_frame["psnr"].shape == (5, F - C)
    # decoding the true latents reproduces the frames exactly: capped PSNR, SSIM 1, LPIPS 0, maze 1
    for name in ("millivid", "ground-truth latents"):
        np.testing.assert_allclose(by[name].per_frame["psnr"], 100.0, atol=1e-9)
        np.testing.assert_allclose(by[name].per_frame["ssim"], 1.0, atol=1e-5)
        np.testing.assert_allclose(by[name].per_frame["lpips"], 0.0, atol=1e-6)
        np.testing.assert_allclose(by[name].per_frame["maze"], 1.0)
    assert by["random latents"].per_frame["psnr"].max() < 100 and by["random latents"].per_frame["maze"].mean() < 0.9
    # random latents: video i scored against its partner's frames at the same indices [C, F)
    partner = ev.derangement(len(keys), cfg.seed)
    want = [ev.psnr(videos[keys[partner[i]]].frames[C:], videos[keys[i]].frames[C:]) for i in range(len(keys))]
    np.testing.assert_allclose(by["random latents"].per_frame["psnr"], np.stack(want))
    # holding the last context frame: stripes 4 pixels wide move 1 pixel per frame, so at offset 1 at
    # least 3/4 of the pixels keep their colour, and after a whole stripe far fewer
    hold_maze = by["hold"].per_frame["maze"].mean(0)
    assert hold_maze[0] >= 0.75 > 0.5 > hold_maze[4:].mean() and by["hold"].per_frame["psnr"].max() < 100
    assert by["hold"].rollout_steps == 16 and by["hold"].wall_s >= 0 and by["ground-truth latents"].wall_s is None
    assert [s.key for s in res.samples] == keys[:2] and set(res.samples[0].plans) == {"millivid"}
    assert set(res.unavailable) == {"dino", "lightglue", "fid", "fvd"}

    out = str(tmp_path / "eval")
    md = ev.report(out, res)
    assert md == os.path.join(out, "results.md")
    expected = ["results.md", "results.json", "per_frame.csv", "consistency.png",
                "videos/000-000.mp4", "videos/000-001.mp4", "plans/000-000-millivid.mp4", "plans/000-001-millivid.mp4"]
    for name in expected:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not [f for root, _, fs in os.walk(out) for f in fs if ".tmp" in f]
    # results.json round-trips to exactly what summarize() computed
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)
    assert summary == json.loads(json.dumps(ev.summarize(res)))
    row = {r["name"]: r for r in summary["rows"]}
    assert row["millivid"]["metrics"]["psnr"] == {"1-1": 100.0, "2-5": 100.0, "6-16": 100.0}
    assert (row["hold"]["rollout_steps"], row["hold"]["network_evals"]) == (16, 800)
    assert row["random latents"]["reference"] and row["random latents"]["rollout_steps"] is None
    text = open(md).read()
    assert "| millivid | **100.00 ± 0.00** |" in text and "random latents (reference)" in text
    assert text.count("unavailable (needs weights:") == 4
    with open(os.path.join(out, "per_frame.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "model,video,offset,frame,psnr,ssim,lpips,maze"
    assert len(lines) == 1 + 4 * 5 * (F - C) and lines[1].startswith("millivid,000/000,1,8,100,1,")
    # the side-by-side video: every frame, (ground truth | millivid | hold | map), upscaled 4x
    import imageio.v2 as imageio
    with imageio.get_reader(os.path.join(out, "videos", "000-000.mp4")) as r:
        frames = [f for f in r]
    assert len(frames) == F and frames[0].shape == (128 + ev.BAR, 4 * 128, 3)
    assert calls[0] == (0, 1, C, cfg.map_size) and calls[F - 1][1] == F


def test_unavailable_metrics_are_reported_with_reason(tmp_path):
    keys = ["000/000", "000/001"]
    cfg = ev.eval_config("tiny", context=C, total=F, buckets=(), num_samples=0)
    res = ev.evaluate_videos(cfg, keys, lambda k: fake_video(int(k[-1])), fake_decode, [],
                             unavailable={"lpips": "LPIPS: unavailable (needs weights: test)"})
    assert res.buckets == [(1, 1), (2, 5), (6, 16)] and "lpips" not in res.rows[0].per_frame
    # the default random-latents path (through load): two videos are each other's partner
    swapped = ev.psnr(fake_video(1).frames[C:], fake_video(0).frames[C:])
    np.testing.assert_allclose(res.rows[1].per_frame["psnr"], [swapped, swapped])
    assert set(res.unavailable) == {"dino", "lightglue", "fid", "fvd", "lpips", "maze"}
    text = open(ev.report(str(tmp_path), res)).read()
    for why in res.unavailable.values():
        assert f"- {why}" in text
    assert json.load(open(tmp_path / "results.json"))["unavailable"] == res.unavailable


def test_write_video_gif_and_plan_frames(tmp_path):
    levels = [np.full((5, 16, 16, 3), 200, np.uint8), np.full((5, 8, 8, 3), 100, np.uint8)]
    frames = list(ev.plan_frames(levels, context=2, display=32))
    assert len(frames) == 5 and frames[0].shape == (32 + ev.BAR, 64, 3)
    assert frames[0][ev.BAR + 5, 5, 0] == 100 and frames[4][ev.BAR + 5, 5, 0] == 200  # context dimmed
    assert frames[4][ev.BAR + 5, 40, 0] == 100                                        # level 1 upscaled
    ev.data.write_video(str(tmp_path / "plan.gif"), frames, fps=10)  # the one video writer (data.py)
    from PIL import Image
    gif = Image.open(tmp_path / "plan.gif")  # Pillow merges identical neighbours: check playing time
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert gif.n_frames == 2 and sum(durations) == 500


def test_bad_protocol_inputs_get_clear_errors():
    keys = ["000/000", "000/001"]
    load = lambda k: fake_video(int(k[-1]))  # noqa: E731
    with pytest.raises(ValueError, match="context < total"):
        ev.evaluate_videos(ev.eval_config("tiny", context=F, total=F), keys, load, fake_decode, [])
    short = ev.Model("short", lambda z, a, seed: [z[0][:, :F - 1]])
    with pytest.raises(ValueError, match="model short: generate returned 23 frames, expected >= 24"):
        ev.evaluate_videos(ev.eval_config("tiny", context=C, total=F, buckets=()), keys, load, fake_decode, [short])
    with pytest.raises(ValueError, match="test video 000/000: 24 frames, evaluation needs total=30"):
        ev.evaluate_videos(ev.eval_config("tiny", context=C, total=30, buckets=()), keys, load, fake_decode, [])


def test_bold_only_where_the_lead_exceeds_the_spread_and_the_reading_line():
    """Mean ± standard error over videos; no bold cell where the two best models' spreads overlap."""
    def results(a, b, random):  # per-frame PSNR (V=4 videos, K=2 offsets) of two models and the references;
        probe = {k: np.full((4, 2), 0.5) for k in ev.PROBE}  # probe metrics, where random latents are lower: not read
        rows = [ev.Row(name, {"psnr": np.array(v, float)} | {k: x - 0.4 * ref for k, x in probe.items()},
                       ["0", "1", "2", "3"], ref)
                for name, v, ref in (("a", a, False), ("b", b, False), ("random latents", random, True))]
        return ev.Results(rows, context=8, buckets=[(1, 1), (2, 2)])
    noisy = ev.results_markdown(ev.summarize(results([[20, 20], [22, 22], [24, 24], [26, 26]],
                                                     [[21, 21], [23, 23], [25, 25], [27, 27]], [[30, 30]] * 4)))
    assert "**" not in noisy and "| b | 24.00 ± 1.29 |" in noisy  # se = std([21, 23, 25, 27]) / 2
    assert "at the longest horizon (2-2) against the random-latents reference" in noisy
    assert "every model is below it on every metric" in noisy
    clear = ev.results_markdown(ev.summarize(results([[20, 20]] * 4, [[30, 31]] * 4, [[25, 25]] * 4)))
    assert "| b | **30.00 ± 0.00** | **31.00 ± 0.00** |" in clear and "| a | 20.00 ± 0.00 |" in clear
    assert "above it on some metric: b." in clear
