"""The feature metrics (DINOv2, LightGlue, FID, FVD) with networks built here, never pretrained: exact identities of
the Fréchet distance, identical videos at the metric's best, a known corruption moving it the right way, the weight
loaders, and the messages when a package or a weight file is missing. Tests that need an optional package
(requirements-metrics.txt) skip without it; FVD and the messages need none."""
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

import evaluate as ev
from test_evaluate import C, F, fake_decode, fake_video

RNG = np.random.default_rng(0)


def smooth_frames(n, size=32, seed=0):
    """n random frames with structure at several scales (something for detectors to find), np.uint8 (n, S, S, 3)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(torch.nn.functional.interpolate(torch.rand(n, 3, s, s, generator=g), size=(size, size), mode="bilinear")
            for s in (4, 8, 16))
    return (x / 3 * 255).round().byte().permute(0, 2, 3, 1).numpy()


def noisy(frames, amount, seed=1):
    noise = np.random.default_rng(seed).normal(0, amount, frames.shape)
    return np.clip(frames + noise, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- Fréchet distance (FID, FVD)

def frechet_by_matrix_root(a, b):
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½ in (D, D) matrices, written out independently."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(inner).sum()


@pytest.mark.parametrize("na, nb, d", [(40, 30, 8), (12, 9, 50)])  # more samples than dimensions, and fewer
def test_frechet_distance_matches_the_matrix_square_root(na, nb, d):
    a, b = RNG.normal(size=(na, d)), RNG.normal(0.3, 1.5, size=(nb, d)) @ RNG.normal(size=(d, d))
    np.testing.assert_allclose(ev.frechet_distance(a, b), frechet_by_matrix_root(a, b), rtol=1e-7)  # eigvalsh: ~1e-9


def test_frechet_distance_identities():
    a = RNG.normal(size=(20, 6)) * [1, 2, 3, 4, 5, 6]
    tr = np.trace(np.cov(a, rowvar=False))
    assert abs(ev.frechet_distance(a, a)) < 1e-9 * tr                             # identical sets: 0
    delta = np.array([1.0, -2, 0, 0.5, 0, 3])
    np.testing.assert_allclose(ev.frechet_distance(a, a + delta), (delta ** 2).sum(), rtol=1e-9)  # shift: ‖δ‖²
    # b = 2a: ‖μ‖² + tr Σ + 4 tr Σ − 2 tr (4 Σ²)^½ = ‖μ‖² + tr Σ
    np.testing.assert_allclose(ev.frechet_distance(a, 2 * a), (a.mean(0) ** 2).sum() + tr, rtol=1e-9)


def test_frechet_distance_agrees_with_clean_fid():
    fid = pytest.importorskip("cleanfid.fid")
    a, b = RNG.normal(size=(300, 16)), RNG.normal(0.2, 1.2, size=(250, 16))
    want = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    np.testing.assert_allclose(ev.frechet_distance(a, b), want, rtol=1e-7)


def test_set_curve_gives_each_clip_to_its_offsets():
    truth = RNG.normal(size=(6, 2, 5))
    shifted = truth + np.array([0.0, 1.0])[None, :, None]  # clip 0 identical, clip 1 shifted by 1 in 5 dimensions
    curve = ev.set_curve(shifted, truth, 40, width=ev.CLIP)
    assert curve.shape == (1, 40) and np.isnan(curve[0, 32:]).all()
    np.testing.assert_allclose(curve[0, :32], [0.0] * 16 + [5.0] * 16, atol=1e-9)


# ----------------------------------------------------------------------------- stand-in TorchScript networks

class StandInI3D(nn.Module):  # I3D's call signature (StyleGAN-V's TorchScript file): clips in [-1, 1] -> 400 features
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 400, (4, 8, 8), stride=(4, 8, 8))

    def forward(self, x, rescale: bool = False, resize: bool = True, return_features: bool = True):
        return torch.tanh(self.conv(x)).mean((2, 3, 4))


class StandInInception(nn.Module):  # what clean-fid's InceptionV3W calls: .layers on (N, 3, 299, 299) -> 2048
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 2048, 13, stride=13), nn.Tanh(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x, return_features: bool = True):
        return self.layers(x).flatten(1)


def scripted(module, path):
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))


def test_fvd_of_identical_and_corrupted_clips(tmp_path):
    scripted(StandInI3D(), tmp_path / "i3d_torchscript.pt")
    nets, why = ev.load_feature_nets(str(tmp_path), ("fvd",))
    assert why == {} and set(nets) == {"fvd"}
    videos = [smooth_frames(40, 16, seed=i) for i in range(6)]  # 6 videos of 2 whole clips (and 8 frames left over)
    feats = lambda vs: np.stack([ev.i3d_features(nets["fvd"], v) for v in vs])  # noqa: E731
    truth = feats(videos)
    assert truth.shape == (6, 2, 400)
    same, light, heavy = (ev.set_curve(feats([noisy(v, s) if s else v for v in videos]), truth, 40, ev.CLIP)[0]
                          for s in (0, 20, 60))
    assert np.abs(same[:32]).max() < 1e-9 and np.isnan(same[32:]).all()
    assert (0 < light[:32]).all() and (light[:32] < heavy[:32]).all()


def test_fid_of_identical_and_corrupted_frames(tmp_path):
    pytest.importorskip("cleanfid")
    scripted(StandInInception(), tmp_path / "inception-2015-12-05.pt")
    nets, why = ev.load_feature_nets(str(tmp_path), ("fid",))
    assert why == {}
    videos = [smooth_frames(3, 32, seed=i) for i in range(8)]
    feats = lambda vs: np.stack([ev.inception_features(nets["fid"], v) for v in vs])  # noqa: E731
    truth = feats(videos)
    assert truth.shape == (8, 3, 2048)
    same, light, heavy = (ev.set_curve(feats([noisy(v, s) if s else v for v in videos]), truth, 3)[0]
                          for s in (0, 20, 60))
    assert np.abs(same).max() < 1e-6 and (0 < light).all() and (light < heavy).all()


# ----------------------------------------------------------------------------- DINOv2

def test_dino_loads_metas_checkpoint_and_scores_cosine(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # Meta's 518² layout
    state = dict(ref.state_dict(), mask_token=torch.zeros(1, 384))  # as in dinov2_vits14_pretrain.pth
    # layer scales of 1, as trained ones are of order 1 (timm's init of 1e-5 would leave the image almost unseen)
    state = {k: torch.ones_like(v) if k.endswith(".gamma") else v for k, v in state.items()}
    torch.save(state, tmp_path / "dino.pth")
    net = ev.dino_net(str(tmp_path / "dino.pth"), "vit_small_patch14_dinov2", size=28)
    # position table: 37² resampled to 2² as torch.hub's DINOv2 does (scale (2 + 0.1) / 37, bicubic, no antialias)
    grid = state["pos_embed"][:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=2.1 / 37, mode="bicubic", antialias=False)
    torch.testing.assert_close(net.pos_embed[:, 1:], want.flatten(2).transpose(1, 2))
    torch.testing.assert_close(net.pos_embed[:, :1], state["pos_embed"][:, :1])
    frames = smooth_frames(4, 32)
    np.testing.assert_allclose(ev.dino_cosine(net, frames, frames), 1.0, atol=1e-6)
    border = frames.copy()
    border[:, :2], border[:, :, -2:] = 0, 255  # outside the centred 28² crop: unseen
    np.testing.assert_allclose(ev.dino_cosine(net, border, frames), 1.0, atol=1e-6)
    assert (ev.dino_cosine(net, noisy(frames, 60), frames) < 1 - 1e-4).all()


# ----------------------------------------------------------------------------- SuperPoint + LightGlue

def random_superpoint(**kw):
    """SuperPoint with He-initialised layers and zero biases: varied descriptors (PyTorch's default init leaves them
    nearly parallel, cosine ~0.9995, so no matcher could tell keypoints apart)."""
    torch.manual_seed(0)
    sp = ev.SuperPoint(**kw)
    for m in sp.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu"), nn.init.zeros_(m.bias)
    return sp.eval()


def identity_lightglue(LightGlue, sharpness=300.0):
    """A LightGlue whose layers pass descriptors through (each block's last FFN layer zeroed), every point matchable,
    and sharp assignment (final projection sharpness·I, similarity 300²/16 x cosine): each keypoint is paired with
    its nearest descriptor, with confidence ~1 where the nearest is clearly nearest."""
    lg = LightGlue(features=None)
    with torch.no_grad():
        for layer in lg.transformers:
            for block in (layer.self_attn, layer.cross_attn):
                block.ffn[-1].weight.zero_(), block.ffn[-1].bias.zero_()
        for head in lg.log_assignment:
            head.final_proj.weight.copy_(sharpness * torch.eye(256)), head.final_proj.bias.zero_()
            head.matchability.weight.zero_(), head.matchability.bias.fill_(20.0)
    state = {}  # as the release's superpoint_lightglue.pth: self_attn.3.* for transformers.3.self_attn.*, and no
    for k, v in lg.state_dict().items():  # confidence_thresholds (a buffer LightGlue derives, newer than the file)
        if k == "confidence_thresholds":
            continue
        for i in range(lg.conf.n_layers):
            k = k.replace(f"transformers.{i}.self_attn", f"self_attn.{i}").replace(f"transformers.{i}.cross_attn",
                                                                                  f"cross_attn.{i}")
        state[k] = v
    return state


def test_lightglue_counts_every_keypoint_of_identical_frames(tmp_path):
    kornia = pytest.importorskip("kornia")
    torch.save(random_superpoint().state_dict(), tmp_path / "superpoint_v1.pth")
    torch.save(identity_lightglue(kornia.feature.LightGlue), tmp_path / "superpoint_lightglue.pth")
    nets, why = ev.load_feature_nets(str(tmp_path), ("lightglue",))
    assert why == {}
    sp, lg, size = nets["lightglue"]
    torch.save({"head.weight": torch.zeros(3)}, tmp_path / "other.pth")  # anything else: refused, naming the file
    with pytest.raises(ValueError, match="other.pth: not LightGlue's weights for SuperPoint"):
        ev.superpoint_lightglue(str(tmp_path / "superpoint_v1.pth"), str(tmp_path / "other.pth"))
    assert size == 1024  # the authors' extraction: long side upsampled to 1024
    nets = (sp, lg, 64)  # here: 32² frames at 64²
    frames = smooth_frames(3, 32)
    gray = kornia.color.rgb_to_grayscale(kornia.geometry.transform.resize(ev.to_float(frames), 64, side="long"))
    keypoints = [len(kp) for kp, _ in sp(gray)]
    assert min(keypoints) > 10 and max(keypoints) <= sp.k
    np.testing.assert_array_equal(ev.lightglue_matches(nets, frames, frames), keypoints)  # every keypoint matched
    other = ev.lightglue_matches(nets, smooth_frames(3, 32, seed=5), frames)
    assert (other < keypoints).all()


def test_superpoint_keypoints_respect_border_limit_and_unit_descriptors():
    sp = random_superpoint(max_keypoints=7)
    with torch.no_grad():
        (kp, d), = sp(ev.to_float(smooth_frames(1, 64))[:, :1])
    assert kp.shape == (7, 2) and d.shape == (7, 256)
    assert ((kp >= 4) & (kp < 60)).all()
    torch.testing.assert_close(d.norm(dim=1), torch.ones(7))


# ----------------------------------------------------------------------------- loading and the report

def test_missing_weights_and_packages_are_named(tmp_path, monkeypatch):
    nets, why = ev.load_feature_nets(str(tmp_path))
    assert nets == {} and set(why) == set(ev.FEATURES)
    for m, (package, files, url) in ev.FEATURES.items():  # every file named, with where to get it
        assert why[m].startswith(f"{ev.METRICS[m][0]}: unavailable (needs ")
        assert all(os.path.join(str(tmp_path), f) in why[m] for f in files) and url in why[m], why[m]
        assert "never downloaded" in why[m] and "--metric_weights" in why[m]
        assert (f"the package {package}: pip install -r requirements-metrics.txt" in why[m]) != _installed(package)
    real_import = __import__
    monkeypatch.setattr("builtins.__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "timm" else real_import(name, *a, **k))
    (tmp_path / "dinov2_vitl14_pretrain.pth").write_bytes(b"")  # the file is there, the package is not
    _, why = ev.load_feature_nets(str(tmp_path), ("dino",))
    assert why["dino"] == "DINOv2 cosine: unavailable (needs the package timm: pip install -r requirements-metrics.txt)"


def test_a_truncated_weight_file_stops_before_any_work_naming_it(tmp_path):
    (tmp_path / "i3d_torchscript.pt").write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(ValueError, match=r"i3d_torchscript.pt: not readable as weights for FVD .*download again from"):
        ev.load_feature_nets(str(tmp_path), ("fvd",))


def _installed(package):
    try:
        __import__(package)
        return True
    except ImportError:
        return False


def test_protocol_reports_fvd_per_clip_without_spread(tmp_path):
    scripted(StandInI3D(), tmp_path / "i3d_torchscript.pt")
    nets, _ = ev.load_feature_nets(str(tmp_path), ("fvd",))
    keys = [f"000/{i:03d}" for i in range(4)]
    videos = {k: fake_video(i) for i, k in enumerate(keys)}
    cfg = ev.eval_config("tiny", context=C, total=F, buckets=(), num_samples=0)

    def hold(latents, actions, seed=0):  # repeats the last context frame
        return [latents[0][:, C - 1:C].expand(-1, F, -1, -1)]
    res = ev.evaluate_videos(cfg, keys, lambda k: videos[k], fake_decode, [ev.Model("hold", hold, 16, 800)],
                             features=nets)
    by = {r.name: r.per_frame for r in res.rows}
    assert by["hold"]["fvd"].shape == (1, F - C) and "fvd" not in res.unavailable
    assert abs(by["ground-truth latents"]["fvd"]).max() < 1e-6 < by["hold"]["fvd"].min()  # exact decoding: 0
    assert set(res.unavailable) == {"dino", "lightglue", "fid", "maze"}
    summary = ev.summarize(res)
    row = {r["name"]: r for r in summary["rows"]}
    assert all(math.isnan(se) for se in row["hold"]["standard_errors"]["fvd"].values())
    np.testing.assert_allclose(list(row["hold"]["metrics"]["fvd"].values()), by["hold"]["fvd"][0, 0])  # one clip
    text = open(ev.report(str(tmp_path / "eval"), res)).read()
    assert "| hold | " in text and "no standard error, never bold" in text
    fvd = f"{by['hold']['fvd'][0, 0]:.2f}"
    assert f"| {fvd} | {fvd} | {fvd} | 16 | 800 |" in text  # one value, not bold although the only model
    # random latents are real frames too: per clip, the same set as the truth (permuted), so FVD 0
    np.testing.assert_allclose(by["random latents"]["fvd"], 0, atol=1e-6)
    lines = open(tmp_path / "eval" / "per_frame.csv").read().splitlines()
    assert lines[0] == "model,video,offset,frame,psnr,ssim,fvd"
    every = [line.split(",") for line in lines[1:] if line.split(",")[1] == "all"]
    assert len(every) == 3 * (F - C) and all(v[4] == "" and v[6] != "" for v in every)
    assert json.load(open(tmp_path / "eval" / "results.json"))["unavailable"] == res.unavailable
