"""Evaluation protocol of MilliVid (paper §4 "Metrics", Table 1, Fig. 3, Fig. 4, Fig. 8, App. A.2
"Inference Details", App. A.3 "Sampling Speed").

Consistency (§4): a model gets the first `context` frames of a ground-truth test video (paper 256) and
the ground-truth actions of all `total` frames (paper 1024), generates the rest (paper 768 frames), and
its level-0 decoding is compared frame by frame with the ground truth. Metrics are averaged over videos
per generated-frame offset k = 1, 2, ... (Fig. 4 / Fig. 8) and over horizon buckets (Table 1: 1-64 /
65-256 / 257-768, i.e. 1/12, 1/3, 1 of the rollout). Two reference rows bracket the models: "ground-truth
latents" decodes the video's own latents (upper bound, incl. the autoencoder's error), "random latents"
decodes another test video's latents at the same frame index (real frames, no consistency).

Frames are channel-last (N, H, W, 3) uint8 (decoder output goes through `tokenizer.to_uint8` once: metrics
see what a viewer sees). Metrics: PSNR (capped at 100 dB), SSIM (Gaussian 11 / 1.5), LPIPS-AlexNet, the maze's
base-colour agreement, and with the optional extras (requirements-metrics.txt) DINOv2 CLS cosine, LightGlue
match counts, FID per frame index and FVD per 16-frame clip (Fig. 8). Weights are read from disk, never
downloaded; what is missing is reported as unavailable with the way to supply it.
"""
import csv
import dataclasses
import inspect
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import data
import diffusion
import rollout
import tokenizer


@dataclass
class EvalConfig:
    context: int = data.MazeConfig.context  # ground-truth context frames, 256; generation starts here (App. A.2)
    total: int = data.MazeConfig.frames     # frames per test video, 1024; [context, total) is generated
    buckets: tuple = ()                 # last generated-frame offset of each horizon bucket (Table 1); () = the
                                        # paper's proportions 1/12, 1/3, 1 of the generated frames (64, 256, 768)
    sampling_steps: int = 50            # DDIM steps per rollout step (App. A.2; presets: RolloutConfig's)
    cfg_scale: float = 1.0              # the paper evaluates without CFG (App. A.2)
    batch_size: int = 8                 # videos in lockstep (App. A.3 times batches of 8)
    num_videos: int = 1000              # test-set size (App. A.1)
    num_samples: int = 4                # test videos written as side-by-side and plan videos
    models: tuple = ("millivid", "framepack", "fullres")  # video models evaluated, {root}/video-<name>
    lpips: bool = True                  # LPIPS-AlexNet when its backbone weights are on disk
    features: tuple = ("dino", "lightglue", "fid", "fvd")  # feature metrics to compute, with their extras installed
    metric_weights: str = "weights"     # the folder of their weight files (README: Feature metrics)
    compile: bool = True                # on CUDA: the video models compiled with CUDA graphs (launch-free sampling)
    fps: int = 20                       # Loopcraft's frame rate
    map_size: int = 128                 # top-down trajectory panel, pixels
    seed: int = 0                       # random-latents pairing
    gate: float = 0.75                  # memory probe: judged once each model's colour where all see >= gate x truth's
    train_seeds: tuple = (0,)           # each model trained with these seeds (seed k > 0: video-<name>-seed<k>)
    sampling_seeds: tuple = (0,)        # each rollout sampled with these noise seeds
    root: str = "runs/paper"            # the pipeline folder train.py wrote (data/, latents/, video-*/)
    official: str = ""                  # a folder of the authors' released files: evaluate those instead (README)
    out: str = ""                       # "" = {root}/eval

    def __post_init__(self):
        if set(self.features) - set(FEATURES):
            raise ValueError(f"EvalConfig.features = {self.features}: expected names among {', '.join(FEATURES)}")
        if set(self.models) - set(rollout.STRATEGIES):
            raise ValueError(f"EvalConfig.models = {self.models}: expected names among {', '.join(rollout.STRATEGIES)}")
        if not (0 < self.context < self.total and self.sampling_steps >= 1 and self.batch_size >= 1
                and self.num_videos >= 2 and self.num_samples >= 0):
            raise ValueError(f"EvalConfig: expected 0 < context < total, sampling_steps >= 1, batch_size >= 1, "
                             f"num_videos >= 2 (the random-latents pairing), num_samples >= 0; got {self}")


# each preset's [context, total) is data.py's and its sampling steps rollout.py's, stated there once
PRESETS = {p: dict(zip(("context", "total"), rollout.preset_frames(p)[1:]),
                   sampling_steps=rollout.rollout_config(p).sampling_steps) | kw for p, kw in {
    "paper": {}, "toy": dict(num_videos=32, batch_size=16), "tiny": dict(num_videos=8, batch_size=4, num_samples=2),
    "spin": dict(num_videos=32, batch_size=16, num_samples=2, train_seeds=(0, 1), sampling_seeds=(0, 1))}.items()}


def video_folder(root, strategy, seed=0):
    """Where train.py puts a video model: {root}/video-<strategy>, and -seed<k> for training seed k > 0."""
    return f"{root}/video-{strategy}" + (f"-seed{seed}" if seed else "")


def eval_config(preset="paper", **overrides):
    """The paper's protocol, or a maze preset's with the same proportions, with strict `overrides`."""
    return data.make_config(EvalConfig, PRESETS, preset, overrides)


def describe(config):
    """A config's settings as `--key=value  meaning` lines (--help); the meaning is its field's comment."""
    meaning = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(type(config)), re.M))
    text = {tuple: lambda v: ",".join(map(str, v)), bool: lambda v: str(v).lower()}
    return "\n".join(f"  --{f.name}={text.get(type(v := getattr(config, f.name)), str)(v)}  {meaning.get(f.name, '')}"
                     .rstrip() for f in dataclasses.fields(config))


# ----------------------------------------------------------------------------- per-frame metrics

PSNR_CAP = 100.0  # dB; identical frames (MSE = 0) score this instead of inf, so bucket means stay finite
DARK = 0.06  # pixels (and palette entries) whose brightest channel is below this have no reliable colour
# name -> (label, higher is better): Table 1's consistency metrics, its quality metrics FID and FVD, the maze's own
METRICS = {"psnr": ("PSNR", True), "ssim": ("SSIM", True), "lpips": ("LPIPS", False), "dino": ("DINOv2 cosine", True),
           "lightglue": ("LightGlue matches", True), "fid": ("FID", False), "fvd": ("FVD", False),
           "maze": ("maze colour", True)}


def to_float(frames, device=None, dtype=torch.float32):
    """(N, H, W, 3) or (H, W, 3) uint8 / float in [0, 1] -> float tensor (N, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    x = x[None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames: expected (N, H, W, 3) channel-last, got shape {tuple(x.shape)}")
    x = x.to(device)  # uint8 crosses to the device before it grows to float
    return (x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)).permute(0, 3, 1, 2)  # (N, 3, H, W)


def _pair(x, y, convert, *args):  # generated frames and ground truth, converted alike; their shapes must agree
    x, y = convert(x, *args), convert(y, *args)
    if x.shape != y.shape:
        raise ValueError(f"generated frames {tuple(x.shape)} and ground truth {tuple(y.shape)} differ in shape")
    return x, y


def psnr(x, y, device=None):
    """Per-frame PSNR in dB on [0, 1] pixels -> np.float64 (N,); identical frames give PSNR_CAP."""
    x, y = _pair(x, y, to_float, device, torch.float64)
    mse = (x - y).square().flatten(1).mean(1)
    # PSNR = 10 log10(MAX² / MSE) with MAX = 1; flooring MSE at 10^(-cap/10) caps it at 100 dB
    return (10 * torch.log10(1 / mse.clamp_min(10 ** (-PSNR_CAP / 10)))).cpu().numpy()


def ssim(x, y, device=None, size=11, sigma=1.5, K1=0.01, K2=0.03):
    """Per-frame SSIM -> np.float64 (N,): SSIM map per channel over 'valid' window positions (as in
    Wang et al.'s reference code: no padding), averaged over positions and then over R, G, B.
    Float64: in float32, E[x²] − μ² leaves ~1e-7 of noise, which C2 = 9e-4 turns into ~1e-4 of SSIM."""
    x, y = _pair(x, y, to_float, device, torch.float64)
    if min(x.shape[-2:]) < size:
        raise ValueError(f"ssim: frames of {tuple(x.shape[-2:])} are smaller than the {size}-pixel window")
    i = torch.arange(size, dtype=torch.float64, device=x.device) - (size - 1) / 2
    g = torch.exp(-i**2 / (2 * sigma**2))
    g = g / g.sum()  # the sampled Gaussian window of Wang et al. (2004), normalised to sum 1
    gh, gv = g.view(1, 1, 1, size).repeat(3, 1, 1, 1), g.view(1, 1, size, 1).repeat(3, 1, 1, 1)
    # separable Gaussian mean per channel: (N, 3, H, W) -> (N, 3, H-10, W-10)
    blur = lambda z: F.conv2d(F.conv2d(z, gh, groups=3), gv, groups=3)  # noqa: E731
    C1, C2 = K1**2, K2**2  # stabilising constants (K·L)² with dynamic range L = 1
    mu_x, mu_y = blur(x), blur(y)
    s_xx, s_yy, s_xy = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    # SSIM = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2))
    s = ((2 * mu_x * mu_y + C1) * (2 * s_xy + C2)) / ((mu_x**2 + mu_y**2 + C1) * (s_xx + s_yy + C2))
    return s.flatten(2).mean(2).mean(1).cpu().numpy()


@torch.no_grad()
def lpips_distance(net, x, y, device=None):
    """Per-frame LPIPS with a given lpips.LPIPS network -> np.float64 (N,); 0 for identical frames."""
    x, y = _pair(x, y, to_float, device)
    return net.to(x.device)(x, y, normalize=True).flatten().double().cpu().numpy()  # normalize: [0,1] -> [-1,1]


def palette_classes(frames, palette, device=None):
    """Each pixel's palette class -> long tensor (N, H, W): the entry of nearest chromaticity. The maze's
    shading scales a base colour, keeping the RGB vector's direction, so we classify by the angle to each
    palette colour (argmax cosine). Entries of one direction (grey floor, white ceiling) are one class;
    near-black pixels are their own class (-1), since their direction is noise."""
    x = to_float(frames, device)  # (N, 3, H, W)
    p = torch.as_tensor(np.asarray(palette), dtype=torch.float32, device=x.device) / 255  # (K, 3)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"palette: expected (K, 3) RGB base colours, got shape {tuple(p.shape)}")
    p_hat = p / p.norm(dim=1, keepdim=True).clamp_min(1e-6)
    same = (p_hat @ p_hat.T) > 1 - 1e-4                                    # (K, K) same direction
    group = same.int().argmax(1)                                           # first entry of each group
    group = torch.where(p.amax(1) < DARK, -1, group)
    cos = torch.einsum("nchw,kc->nkhw", x, p_hat) / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
    cos = torch.where((p.amax(1) < DARK).view(1, -1, 1, 1), -2.0, cos)     # dark entries never win
    cls = group[cos.argmax(1)]                                             # (N, H, W)
    return torch.where(x.amax(1) < DARK, -1, cls)


def palette_agreement(x, y, palette, device=None):
    """Maze metric: per frame, the fraction of pixels whose base-colour class matches -> np.float64 (N,)."""
    a, b = _pair(x, y, palette_classes, palette, device)
    return (a == b).flatten(1).double().mean(1).cpu().numpy()


def frame_metrics(generated, truth, palette=None, lpips_net=None, device=None, chunk=128, features=None):
    """Every available per-frame metric of one video -> {metric: np.float64 (N,)}, `chunk` frames at a time;
    features: load_feature_nets' networks (DINOv2, LightGlue)."""
    fns, features = {"psnr": psnr, "ssim": ssim}, features or {}
    if lpips_net is not None:
        fns["lpips"] = lambda g, t, d: lpips_distance(lpips_net, g, t, d)
    if "dino" in features:
        fns["dino"] = lambda g, t, d: dino_cosine(features["dino"], g, t, d)
    if "lightglue" in features:
        fns["lightglue"] = lambda g, t, d: lightglue_matches(features["lightglue"], g, t, d)
    if palette is not None:
        fns["maze"] = lambda g, t, d: palette_agreement(g, t, palette, d)
    return {name: np.concatenate([fn(generated[i:i + chunk], truth[i:i + chunk], device)
                                  for i in range(0, len(truth), chunk)]) for name, fn in fns.items()}


# ----------------------------------------------------------------------------- feature metrics (optional extras)

# DINOv2, LightGlue, FID and FVD (§4, Table 1, Fig. 8) run networks with pretrained weights. Their packages are an
# optional extra (pip install -r requirements-metrics.txt) and their weights are files in one folder (--metric_weights):
# nothing is downloaded. Each metric loads on its own; a missing package or file makes it unavailable, with the way
# to supply it, and every other metric still runs. Preprocessing follows the authors' code, noted at each step.
FEATURES = {  # metric -> (package, weight files, where the user gets them)
    "dino": ("timm", ("dinov2_vitl14_pretrain.pth",),
             "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"),
    "lightglue": ("kornia", ("superpoint_v1.pth", "superpoint_lightglue.pth"),
                  "https://github.com/cvg/LightGlue/releases/download/v0.1_arxiv/<file>"),
    "fid": ("cleanfid", ("inception-2015-12-05.pt",),
            "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"),
    "fvd": ("torch", ("i3d_torchscript.pt",),
            "https://huggingface.co/kiwhansong/DFoT/resolve/main/metrics_models/i3d_torchscript.pt")}
SET_METRICS = ("fid", "fvd")  # statistics of the whole test set per frame index, not per video: no standard error
CLIP = 16  # FVD: I3D sees 16-frame clips, the generated frames cut from the first on (the authors' chunks)


def load_feature_nets(folder, metrics=tuple(FEATURES), frame_size=256, device=None,
                      dino_arch="vit_large_patch14_dinov2"):
    """The networks of each requested feature metric from `folder` -> ({metric: network(s)}, {metric: why not})."""
    nets, why = {}, {}
    for m in metrics:
        package, files, url = FEATURES[m]
        missing, needs = [p for p in (os.path.join(folder, f) for f in files) if not os.path.isfile(p)], []
        try:
            __import__(package)
        except ImportError:
            needs.append(f"the package {package}: pip install -r requirements-metrics.txt")
        if missing:
            needs.append(f"weights: {', '.join(missing)}, from {url}; never downloaded at run time: put the file(s) "
                         "there, or point --metric_weights at their folder")
        if needs:  # everything the user must supply, in one message
            why[m] = f"{METRICS[m][0]}: unavailable (needs {'; and '.join(needs)})"
            continue
        path = os.path.join(folder, files[0])
        try:  # a truncated download or another file stops the evaluation before any work, naming the file
            if m == "dino":  # the largest multiple of the 14-pixel patch that fits the frame (256 -> 252)
                nets[m] = dino_net(path, dino_arch, frame_size // 14 * 14).to(device)
            elif m == "lightglue":
                nets[m] = superpoint_lightglue(path, os.path.join(folder, files[1]))
            else:  # TorchScript, the only form of these two files (torch says it is deprecated: not news to the user)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    if m == "fid":  # Inception-v3 as clean-fid wraps it: 2048 pool features of [0, 255] pixels
                        from cleanfid.inception_torchscript import InceptionV3W
                        nets[m] = InceptionV3W(folder, download=False).to(device)
                    else:  # I3D on Kinetics-400, as StyleGAN-V converted it (the authors' file)
                        nets[m] = torch.jit.load(path, map_location="cpu").eval().to(device)
        except Exception as e:
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"{' or '.join(os.path.join(folder, f) for f in files)}: not readable as weights for "
                             f"{METRICS[m][0]} ({type(e).__name__}: {first}); download again from {url}, or leave it "
                             "out with --features") from e
    return nets, why


def dino_net(path, arch="vit_large_patch14_dinov2", size=252):
    """DINOv2 (timm's ViT) from Meta's checkpoint; its 37² position table resampled to `size` / 14 patches the way
    torch.hub's DINOv2 (the authors' loader) does at run time: bicubic, no antialias, scale (n + 0.1) / 37."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn
    state = torch.load(path, map_location="cpu", weights_only=True)
    pos, n = state["pos_embed"], size // 14  # (1, 1 + 37², D)
    M = math.isqrt(pos.shape[1] - 1)
    grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2).float()  # (1, D, 37, 37)
    grid = F.interpolate(grid, scale_factor=(n + 0.1) / M, mode="bicubic", antialias=False)  # (1, D, n, n)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)  # (1, 1 + n², D)
    net = timm.create_model(arch, pretrained=False, img_size=size, num_classes=0)  # output: the normed CLS token
    net.load_state_dict(checkpoint_filter_fn(state, net))
    return net.eval()


@torch.no_grad()
def dino_cosine(net, x, y, device=None):
    """Per-frame cosine similarity of DINOv2 CLS tokens -> np.float64 (N,). Frames are centre-cropped to a multiple
    of the 14-pixel patch (256 -> 252, as the authors) and ImageNet-normalised."""
    x, y = _pair(x, y, to_float, device)
    size = net.patch_embed.img_size[0]
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    cls = lambda z: net.to(z.device)((z[..., top:top + size, left:left + size] - mean) / std)  # noqa: E731
    return F.cosine_similarity(cls(x), cls(y), dim=-1).double().cpu().numpy()


class SuperPoint(torch.nn.Module):
    """SuperPoint keypoints and descriptors (DeTone et al. 2018), the detector the paper's LightGlue metric uses,
    written out as LightGlue's release runs it (the authors' settings: at most 1024 keypoints, non-maximum
    suppression radius 4, score > 0.0005, 4-pixel border dropped); parameter names of MagicLeap's superpoint_v1.pth."""
    def __init__(self, max_keypoints=1024, nms_radius=4, threshold=0.0005, border=4):
        super().__init__()
        self.k, self.r, self.threshold, self.border = max_keypoints, nms_radius, threshold, border
        conv = lambda i, o, k=3: torch.nn.Conv2d(i, o, k, padding=k // 2)  # noqa: E731
        for name, (i, o) in zip(("1a", "1b", "2a", "2b", "3a", "3b", "4a", "4b"), [(1, 64)] + [(64, 64)] * 3 +
                                [(64, 128)] + [(128, 128)] * 3):  # a VGG encoder, 1/8 resolution
            setattr(self, f"conv{name}", conv(i, o))
        self.convPa, self.convPb = conv(128, 256), conv(256, 65, 1)  # detector: 64 pixels of a cell + "none"
        self.convDa, self.convDb = conv(128, 256), conv(256, 256, 1)  # descriptor

    def forward(self, gray):
        """(B, 1, H, W) in [0, 1], H and W multiples of 8 -> per image (keypoints (n, 2) as x, y; descriptors
        (n, 256))."""
        x = gray
        for i, name in enumerate(("1a", "1b", "2a", "2b", "3a", "3b", "4a", "4b")):
            x = F.relu(getattr(self, f"conv{name}")(x))
            x = F.max_pool2d(x, 2) if i in (1, 3, 5) else x  # (B, 128, H/8, W/8) at the end
        # softmax over a cell's 64 pixels and "no keypoint", then the cell's channels back to its 8x8 pixels
        s = F.pixel_shuffle(F.softmax(self.convPb(F.relu(self.convPa(x))), 1)[:, :-1], 8)[:, 0]  # (B, H, W)
        # non-maximum suppression as LightGlue's release: local maxima, then twice more outside their reach
        pool = lambda z: F.max_pool2d(z, 2 * self.r + 1, stride=1, padding=self.r)  # noqa: E731
        peak = s == pool(s)
        for _ in range(2):
            near = pool(peak.float()) > 0
            rest = torch.where(near, 0, s)
            peak |= (rest == pool(rest)) & ~near
        s = torch.where(peak, s, 0)
        b = self.border
        s[:, :b], s[:, -b:], s[:, :, :b], s[:, :, -b:] = -1, -1, -1, -1
        d = F.normalize(self.convDb(F.relu(self.convDa(x))), dim=1)  # (B, 256, H/8, W/8)
        out, (h, w) = [], d.shape[-2:]
        for si, di in zip(s, d):
            yx = torch.nonzero(si > self.threshold)  # (n, 2) row-major, as torch.where
            score = si[yx[:, 0], yx[:, 1]]
            if len(yx) > self.k:
                yx = yx[torch.topk(score, self.k).indices]
            kp = yx.flip(1).float()  # (n, 2) x, y
            # descriptor at a keypoint: bilinear in the 1/8 map, pixel p -> (p - 3.5) / (8·size - 4.5) · 2 - 1
            g = (kp - 3.5) / torch.tensor([8 * w - 4.5, 8 * h - 4.5], device=kp.device) * 2 - 1
            desc = F.grid_sample(di[None], g.view(1, 1, -1, 2), mode="bilinear", align_corners=True)  # (1, 256, 1, n)
            out.append((kp, F.normalize(desc[0, :, 0].T, dim=1)))  # (n, 2), (n, 256)
        return out


def superpoint_lightglue(superpoint_path, lightglue_path, resize=1024):
    """(SuperPoint, kornia's LightGlue for SuperPoint features, resize) from the LightGlue release's files."""
    from kornia.feature import LightGlue
    sp = SuperPoint()
    sp.load_state_dict(torch.load(superpoint_path, map_location="cpu", weights_only=True))
    lg, state = LightGlue(features=None), torch.load(lightglue_path, map_location="cpu", weights_only=True)
    for i in range(lg.conf.n_layers):  # the release's names, renamed as kornia does for its own download
        for a in ("self_attn", "cross_attn"):
            state = {k.replace(f"{a}.{i}", f"transformers.{i}.{a}"): v for k, v in state.items()}
    # strict but for a buffer LightGlue derives in __init__, which the v0.1 release file predates
    missing, unexpected = lg.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"confidence_thresholds"}:
        raise ValueError(f"{lightglue_path}: not LightGlue's weights for SuperPoint (missing {missing}, "
                         f"unexpected {unexpected})")
    return sp.eval().requires_grad_(False), lg.eval().requires_grad_(False), resize


@torch.no_grad()
def lightglue_matches(nets, x, y, device=None, threshold=0.5):
    """Per frame, the number of LightGlue matches between generated and true frame with confidence > `threshold`
    -> np.float64 (N,). As the authors' code: each frame upsampled so its long side is 1024 (bilinear, antialiased),
    grey, SuperPoint keypoints mapped back to frame pixels, one LightGlue call per pair."""
    from kornia.color import rgb_to_grayscale
    from kornia.geometry.transform import resize
    sp, lg, size = nets
    x, y = _pair(x, y, to_float, device)
    H, W = x.shape[-2:]
    sp, lg = sp.to(x.device), lg.to(x.device)
    feats = []
    for z in (x, y):
        z = resize(z, size, side="long", antialias=True)  # (N, 3, H', W')
        scale = torch.tensor([z.shape[-1] / W, z.shape[-2] / H], device=z.device)
        feats.append([((kp + 0.5) / scale - 0.5, d) for kp, d in sp(rgb_to_grayscale(z))])
    wh = torch.tensor([[W, H]], device=x.device, dtype=torch.float32)  # LightGlue normalises keypoints by it
    count = lambda a, b: (lg({f"image{i}": {"keypoints": kp[None], "descriptors": d[None], "image_size": wh}  # noqa
                              for i, (kp, d) in enumerate((a, b))})["scores"][0] > threshold).sum().item()
    return np.array([count(a, b) for a, b in zip(*feats)], np.float64)


@torch.no_grad()
def inception_features(net, frames, device=None, chunk=64):
    """FID: Inception-v3 pool features of each frame -> float32 (N, 2048). clean-fid's "clean" resize (the authors'):
    each channel to 299² by PIL bicubic in float, clipped to [0, 255]."""
    from cleanfid.resize import build_resizer
    resize, frames = build_resizer("clean"), np.asarray(frames)
    out = []
    for i in range(0, len(frames), chunk):
        x = np.stack([resize(f) for f in frames[i:i + chunk]])  # (n, 299, 299, 3) float32 in [0, 255]
        out.append(net(torch.from_numpy(x).permute(0, 3, 1, 2).to(device)).float().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def i3d_features(net, frames, device=None, chunk=8):
    """FVD: I3D features of each whole 16-frame clip -> float32 (N // 16, 400); pixels to [-1, 1], I3D resizes
    (to 224²), `chunk` clips at a time."""
    x = to_float(frames[:len(frames) // CLIP * CLIP], device) * 2 - 1  # (J·16, 3, H, W)
    x = x.view(-1, CLIP, *x.shape[1:]).transpose(1, 2)  # (J, 3, 16, H, W)
    return torch.cat([net(x[i:i + chunk].contiguous(), rescale=False, resize=True, return_features=True)
                      for i in range(0, len(x), chunk)]).float().cpu().numpy()


def frechet_distance(a, b):
    """Fréchet distance of Gaussians fitted to feature sets a (Na, D) and b (Nb, D) (FID, FVD):
    ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa Σb)^½. With centred features X (Σ = XᵀX / (N − 1)) the nonzero eigenvalues
    of Σa Σb are those of A Aᵀ, A = Xa Xbᵀ / √((Na − 1)(Nb − 1)), so tr (Σa Σb)^½ is the sum of A's singular
    values: an (Na, Nb) SVD instead of a (D, D) matrix square root, exact, and fast for 2048-d FID per frame index."""
    a, b = (torch.as_tensor(np.asarray(z), dtype=torch.float64) for z in (a, b))
    xa, xb, na, nb = a - a.mean(0), b - b.mean(0), len(a) - 1, len(b) - 1
    root = torch.linalg.svdvals(xa @ xb.T).sum() / math.sqrt(na * nb)
    return float((a.mean(0) - b.mean(0)).square().sum() + xa.square().sum() / na + xb.square().sum() / nb - 2 * root)


def set_curve(generated, truth, K, width=1):
    """FID per frame index, or FVD per clip given to each of its 16 offsets (NaN after the last whole clip), over the
    test set: generated (V', J, D) and truth (V, J, D) features of each video's j-th frame or clip (`width`
    frames) -> (1, K)."""
    d = [frechet_distance(g, t) for g, t in zip(np.swapaxes(generated, 0, 1), np.swapaxes(truth, 0, 1))]  # (J,)
    curve = np.repeat(d, width)
    return np.pad(curve, (0, K - len(curve)), constant_values=np.nan)[None]


# ----------------------------------------------------------------------------- horizons, aggregation, references

def horizon_buckets(num_generated, ends=None):
    """Horizon buckets as 1-based inclusive offset ranges [(first, last), ...]: from explicit `ends` (paper
    (64, 256, 768)) or, when None or empty, Table 1's proportions 1/12, 1/3, 1 of `num_generated`, rounded."""
    ends = [round(p * num_generated) for p in (1 / 12, 1 / 3, 1)] if not ends else [int(e) for e in ends]
    if not ends or ends[0] < 1 or any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] > num_generated:
        raise ValueError(f"buckets: expected increasing ends in 1..{num_generated} (generated frames), got {ends}")
    return [(first + 1, last) for first, last in zip([0] + ends[:-1], ends)]


def nanmean(x, axis=None):
    """np.nanmean, quietly NaN where all is NaN (the probe's categories are empty in some frames)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis)


def bucket_means(per_frame, buckets):
    """(V, K) per-frame values -> [mean over the bucket's offsets of the per-offset video mean]."""
    c = nanmean(np.asarray(per_frame, np.float64), 0)  # (K,) the Fig. 4 curve: mean over videos per offset
    return [float(nanmean(c[first - 1:last])) for first, last in buckets]


def bucket_spreads(per_frame, buckets):
    """(V, K) -> [standard error over videos of each video's bucket mean] (NaN with one row: FID, FVD)."""
    v = [nanmean(np.asarray(per_frame, np.float64)[:, a - 1:b], 1) for a, b in buckets]  # (V,) each
    return [float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else math.nan for x in (x[np.isfinite(x)] for x in v)]


def derangement(n, seed=0):
    """Deterministic pairing video i -> video perm[i] with perm[i] != i (the random-latents row): a seeded
    shuffle read as one n-cycle (each video paired with the next in shuffled order) has no fixed point."""
    if n < 2:
        raise ValueError(f"derangement: the random-latents row needs at least 2 test videos, got {n}")
    order, perm = np.random.default_rng(seed).permutation(n), np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def decode_frames(decode, z, level=0, device=None, chunk=64):
    """Latents (N, T_l, C) of one level decoded alone, `chunk` frames at a time -> np.uint8 (N, H, W, 3);
    decode(z (n, T_l, C), level) -> (n, 3, H, W) in [0, 1], the level-0 output of that level (Fig. 5)."""
    z = (torch.from_numpy(np.asarray(z, dtype=np.float32)) if isinstance(z, np.ndarray) else z.float()).to(device)
    with torch.no_grad():
        return np.concatenate([tokenizer.to_uint8(decode(z[i:i + chunk], level)) for i in range(0, len(z), chunk)])


# ----------------------------------------------------------------------------- the memory probe

# Ordinary metrics cannot see memory: most of a rollout shows what was just seen (carried forward) or what
# nobody saw. The probe scores each generated wall pixel by what the compared strategies can know of it
# (rollout.knowledge over the maze's visible faces): its face is knowable to all of them, only to
# MilliVid (content beyond the baselines' reach), or to none (a control: every model should be at chance).
CATEGORIES = {"all": "seen by all", "only": "MilliVid only", "none": "seen by none"}
PROBE = {f"{m}_{c}": (f"{label} {name}", True) for m, label in (("colour", "colour,"), ("psnr", "PSNR,"))
         for c, name in CATEGORIES.items()}  # per-frame metrics on each category's pixels (NaN: none there)
METRICS |= PROBE


def probe_categories(plans, face, wall, seen, context):
    """One test video's pixel categories and swap control. plans: {strategy: (steps, num_clipped)}; face:
    (F, W) the wall face each column shows; wall: (F, H, W) its pixels; seen: per frame, its faces.
    Returns (int8 (K, H, W): each generated pixel's index in CATEGORIES, -1 for floor, sky and the rest;
    the swap: context frames showing no face seen by all). 'MilliVid only' counts only content the swap
    removes from MilliVid's reach, so the control must drop it to chance and leave 'seen by all' as is."""
    n = len(face)
    knows = lambda plan, seen: np.array([[f in k for f in row] for k, row in zip(  # (K, W) bool
        rollout.knowledge(plan[0], context, n, seen, plan[1])["known"], face[context:])], bool)
    can = {s: knows(p, seen) for s, p in plans.items()}
    every, some = np.logical_and.reduce(list(can.values())), np.logical_or.reduce(list(can.values()))
    common = set(face[context:][every].tolist())
    swap = [f for f in range(context) if not seen[f] & common]
    only = can.get("millivid", np.zeros_like(every)) & ~np.logical_or.reduce(  # (no MilliVid: none)
        [c for s, c in can.items() if s != "millivid"] or [np.zeros_like(every)])
    if "millivid" in plans:  # knowable from a swapped frame only
        only &= ~knows(plans["millivid"], [set() if f in swap else s for f, s in enumerate(seen)])
    cat = np.select([every, only, ~some], [0, 1, 2], -1)[:, None, :]  # (K, 1, W): a column's pixels share it
    return np.where(wall[context:], cat, -1).astype(np.int8), swap


def probe_metrics(frames, truth, cat, palette):
    """Per generated frame, colour agreement and PSNR on each category's pixels -> {PROBE metric: (K,)}."""
    match = (palette_classes(frames, palette) == palette_classes(truth, palette)).numpy().reshape(len(cat), -1)
    err = (((frames.astype(np.float64) - truth) / 255) ** 2).mean(-1).reshape(len(cat), -1)  # (K, H·W)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0: no pixel of that category, NaN
        for i, c in enumerate(CATEGORIES):
            where = (cat == i).reshape(len(cat), -1)                                        # (K, H·W)
            out[f"colour_{c}"] = (where * match).sum(1) / where.sum(1)
            mse = np.maximum((where * err).sum(1) / where.sum(1), 10 ** (-PSNR_CAP / 10))  # capped as in `psnr`
            out[f"psnr_{c}"] = -10 * np.log10(mse)
    return out


def probe_verdict(rows, gate):
    """Plain language: is the memory effect confirmed, refuted, or not measurable at this scale, and why. The
    gate: every model's colour on what all can see reaches `gate` x the ground-truth latents', and those beat
    random latents beyond the spread (else a missing memory could be plain incompetence)."""
    models = [m for m in ("millivid", "framepack", "fullres", "framepack_hier", "upscale") if m in rows]
    if models[:1] != ["millivid"] or len(models) < 2 or not np.isfinite(rows["millivid"]["colour_only"][0]):
        return "Not measurable: " + (
            "no generated pixel shows content only MilliVid can see (these test videos do not revisit at the lags "
            "where only MilliVid looks)." if len(models) > 1 and models[0] == "millivid" else
            "the probe compares MilliVid with at least one baseline.")
    (g, g_se), (chance, c_se) = rows["ground-truth latents"]["colour_all"], rows["random latents"]["colour_all"]
    low = [f"{m} {rows[m]['colour_all'][0]:.3f}" for m in models if not rows[m]["colour_all"][0] >= gate * g]
    (m, m_se), swap = rows["millivid"]["colour_only"], rows.get("millivid swap", {}).get("colour_only")
    lead = [b for b in models[1:] if m - rows[b]["colour_only"][0] > m_se + rows[b]["colour_only"][1]]
    drop = swap is not None and m - swap[0] > m_se + swap[1]
    others = ", ".join(f"{b} {rows[b]['colour_only'][0]:.3f}" for b in models[1:])
    found = (f"on content only MilliVid can see, its colour agreement {m:.3f} leads {', '.join(lead) or 'no baseline'}"
             f" beyond both standard errors ({others}), "
             "and the swap control " + (f"drops it to {swap[0]:.3f}" if drop else "does not move it beyond the spread"))
    if low or g - chance <= g_se + c_se:
        return ("Not measurable at this scale by the gate: on pixels every model can see, " + (
            f"{', '.join(low)} reach(es) less than {gate:g} x the ground-truth latents' {g:.3f}" if low else
            "the ground-truth latents do not beat random ones beyond the spread")
            + f". (Measured all the same: {found}.)")
    return f"{'Confirmed' if len(lead) == len(models) - 1 and drop else 'Not confirmed'} at this scale: {found}."


# ----------------------------------------------------------------------------- results and report

@dataclass
class Row:
    """One line of the table: a model or a reference row, its per-frame values and its cost."""
    name: str
    per_frame: dict                    # metric -> np (V, K): video v, generated-frame offset k = 1..K
    keys: list                         # the V test-video keys
    reference: bool = False            # reference rows decode latents: no rollout cost
    rollout_steps: int | None = None   # per video (App. A.3)
    network_evals: int | None = None   # per video: rollout steps x sampling steps (x 2 with CFG)
    wall_s: float | None = None        # generation wall time per video, in batches of batch_size
    trained: str | None = None         # how long the model was trained, and on what


@dataclass
class Sample:
    """One test video shown side by side; every video is whole (context + generated) np.uint8 (F, H, W, 3)."""
    key: str
    frames: dict                       # "ground truth" first, then model name -> video
    map: object = None                 # top-down trajectory: np.uint8 (S, S, 3) or a callable t -> one
    plans: dict = field(default_factory=dict)  # model name -> per level np.uint8 (F, H', W', 3)


@dataclass
class Results:
    """What `report` writes: made by `evaluate_videos`, or by hand from any per-frame values."""
    rows: list                         # [Row]: models first, then the reference rows
    context: int                       # generated offset k is video frame context + k - 1
    buckets: list                      # [(first, last)] offsets, 1-based inclusive
    samples: list = field(default_factory=list)      # [Sample]
    unavailable: dict = field(default_factory=dict)  # metric -> why, and how to supply what it needs
    config: dict = field(default_factory=dict)       # resolved EvalConfig and git commit
    fps: int = 20


def summarize(results):
    """Everything results.json holds: bucket means per row and metric, cost, what was not measured."""
    present = [m for m in METRICS if any(m in r.per_frame for r in results.rows)]
    return {
        "context": results.context, "buckets": [list(b) for b in results.buckets],
        "metrics": {m: {"label": METRICS[m][0], "higher_is_better": METRICS[m][1]} for m in present},
        "unavailable": dict(results.unavailable), "config": dict(results.config),
        "rows": [{"name": r.name, "reference": r.reference, "videos": len(r.keys),
                  **{key: {m: dict(zip([f"{a}-{b}" for a, b in results.buckets], fn(r.per_frame[m], results.buckets)))
                           for m in present if m in r.per_frame}
                     for key, fn in (("metrics", bucket_means), ("standard_errors", bucket_spreads))},
                  "rollout_steps": r.rollout_steps, "network_evals": r.network_evals, "wall_s_per_video": r.wall_s,
                  "trained": r.trained, "probe": {m: bucket_means(r.per_frame[m], [(1, K)]) + bucket_spreads(
                      r.per_frame[m], [(1, K)]) for m in PROBE if m in r.per_frame}}  # all generated frames
                 for r in results.rows for K in [next(iter(r.per_frame.values())).shape[1]]]}


def results_markdown(summary):
    """results.md. Table 1 layout: one row per model / reference, metric x bucket columns (mean ± standard
    error over videos), then the cost columns. The best model of a column is bold only if its lead over the
    runner-up exceeds their two standard errors together: no bold where the spreads overlap. Then the reading
    against the random-latents reference, the memory probe (where measured), what was not measured."""
    def table(head, rows):  # markdown lines: a `row` column, then `head`; rows: [(name, [cell, ...])]
        return ["| row | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"] + [
            f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]

    def cell(m, v, se):  # mean ± standard error: fractions to 3 decimals, the rest (dB, counts, distances) to 2
        d = 2 if "psnr" in m or m in ("lightglue", *SET_METRICS) else 3
        return f"{v:.{d}f}" + ("" if math.isnan(se) else f" ± {se:.{d}f}")
    buckets, metrics = [f"{a}-{b}" for a, b in summary["buckets"]], summary["metrics"]
    cols = [(m, b) for m in metrics if m not in PROBE for b in buckets]
    models, best, rows = [r for r in summary["rows"] if not r["reference"]], {}, []
    for m, b in cols:  # (value, se) of the models, best first
        ranked = sorted(((r["metrics"][m][b], r["standard_errors"][m][b]) for r in models if m in r["metrics"]),
                        reverse=metrics[m]["higher_is_better"])
        if m not in SET_METRICS and (len(ranked) == 1 or len(ranked) > 1 and  # FID, FVD: no spread to lead beyond
                                     abs(ranked[0][0] - ranked[1][0]) > ranked[0][1] + ranked[1][1]):
            best[m, b] = ranked[0][0]
    for r in summary["rows"]:
        cells = []
        for m, b in cols:
            v, se = r["metrics"].get(m, {}).get(b), r["standard_errors"].get(m, {}).get(b)
            text = "n/a" if v is None else cell(m, v, se)
            cells.append(f"**{text}**" if not r["reference"] and v is not None and v == best.get((m, b)) else text)
        cells += ["—" if r[k] is None else f"{r[k]:.3g}" if k == "wall_s_per_video" else str(r[k])
                  for k in ("rollout_steps", "network_evals", "wall_s_per_video", "trained")]
        rows.append((r["name"] + (" (reference)" if r["reference"] else ""), cells))
    head = [f"{metrics[m]['label']} {'↑' if metrics[m]['higher_is_better'] else '↓'} {b}" for m, b in cols]
    # the reading: at the longest horizon, does a model beat the random-latents reference on some metric?
    ref = next((r["metrics"] for r in summary["rows"] if r["name"] == "random latents"), {})
    last = "-".join(map(str, summary["buckets"][-1]))  # METRICS[m][1]: higher is better
    above = sorted({r["name"] for r in models for m in ref if m not in PROBE and m not in SET_METRICS  # consistency
                    and (r["metrics"][m][last] - ref[m][last]) * (1 if METRICS[m][1] else -1) > 0})  # (probe: its own)
    verdict = (f"above it on some metric: {', '.join(above)}" if above else
               "every model is below it on every metric: none is consistent this far at this scale")
    probe = {r["name"]: r["probe"] for r in summary["rows"]}
    text = ["# MilliVid evaluation (paper §4, Table 1)", "",
            f"{summary['rows'][0]['videos'] if summary['rows'] else 0} test videos, context {summary['context']} "
            "frames; each metric is averaged over videos per generated-frame offset, then over the offsets of "
            f"each bucket. PSNR of identical frames is capped at {PSNR_CAP:g} dB.", ""]
    text += table(head + ["rollout steps", "network evals", "wall s/video", "trained"], rows) + [
        "", f"Reading: at the longest horizon ({last}) against the random-latents reference (real frames, no "
        f"consistency), {verdict if ref else 'no reference row'}. Bold: a lead beyond both standard errors.", ""] + [
        "FID and FVD (quality) compare the whole set of generated frames at each frame index (FVD: 16-frame clips) "
        "with the true ones: one number per index, no standard error, never bold; with fewer videos than feature "
        "dimensions (2048, 400) both are biased upward, so compare rows of equal video counts only.", ""
        ] * any(m in metrics for m in SET_METRICS)
    if any(probe.values()):  # the memory probe over all generated frames: mean ± standard error over videos
        text += ["## Memory probe", "", "Each generated wall pixel is scored by what the compared strategies can know "
                 "of its wall face from the ground-truth context (rollout.knowledge). Colour: agreement of base-colour "
                 "classes (chance ≈ 1/8). The *swap* rows: per video, the context frames that show no face of a "
                 "*seen by all* pixel come from another video; *MilliVid only* counts only content that this swap "
                 "takes away.", ""] + table([PROBE[m][0] for m in PROBE], [(r["name"], [
                     cell(m, *r["probe"][m]) if np.isfinite(r["probe"][m][0]) else "— (no pixel)" for m in PROBE])
                     for r in summary["rows"]]) + ["", probe_verdict(probe, summary["config"].get("gate", 0.75)), ""]
    text += ["## Not measured", ""] + (
        [f"- {why}" for why in summary["unavailable"].values()] or ["- (everything was measured)"])
    text += ["", "Beside this file: `results.json`, `per_frame.csv`, `consistency.png` (Fig. 4), `videos/` "
             "(Fig. 3) and `plans/` (each level decoded alone).", "",
             "Configuration: " + ", ".join(f"{k}={v}" for k, v in summary["config"].items()), ""]
    return "\n".join(text)


def plot_curves(path, results, metrics):
    """Each consistency metric against generated-frame offset, one line per row (paper Fig. 4 / Fig. 8)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    cols = min(4, len(metrics))  # the memory probe's metrics, one per category, wrap onto more rows
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, m in zip(axes.flat, metrics):
        for r in results.rows:
            if m in r.per_frame:
                c = nanmean(np.asarray(r.per_frame[m], np.float64), 0)  # mean over videos per offset
                ax.plot(np.arange(1, len(c) + 1), c, label=r.name, ls="--" if r.reference else "-", lw=1.2)
        for _, last in results.buckets[:-1]:
            ax.axvline(last, color="0.7", lw=0.8, ls=":")
        ax.set(title=f"{METRICS[m][0]} ({'higher' if METRICS[m][1] else 'lower'} is better)",
               xlabel="frames generated since the context")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    data.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


BAR = 14  # pixels of caption above each video tile


def tiled_frames(videos, context, caption, square=None, display=128):
    """Yield the frames of a video of tiles side by side: videos [(name, np.uint8 (F, H', W', 3))], each resized to
    the first's size scaled to about `display` rows, half as bright in the context, under its caption(i, name, t);
    then the map: square(t), or one image for every frame."""
    from PIL import Image, ImageDraw

    def tile(img, size, label, dim):
        im = Image.fromarray(np.asarray(img) // 2 if dim else np.asarray(img)).resize(size, Image.NEAREST)
        canvas = Image.new("RGB", (size[0], size[1] + BAR))
        canvas.paste(im, (0, BAR))
        ImageDraw.Draw(canvas).text((3, 1), label, fill=(255, 255, 255))
        return np.asarray(canvas)
    num_frames, H, W = videos[0][1].shape[:3]
    s = max(1, math.ceil(display / H))  # an integer nearest-neighbour upscaling keeps pixels honest
    for t in range(num_frames):
        tiles = [tile(v[t], (W * s, H * s), caption(i, name, t), t < context) for i, (name, v) in enumerate(videos)]
        if square is not None:
            tiles.append(tile(square(t) if callable(square) else square, (H * s, H * s), "map", False))
        yield np.concatenate(tiles, axis=1)


def side_by_side_frames(sample, context, display=128):
    """Yield the frames of a comparison video: ground truth | each model | the top-down map (Fig. 3)."""
    when = lambda t: "context" if t < context else f"+{t - context + 1}"  # noqa: E731
    return tiled_frames(list(sample.frames.items()), context,
                        lambda i, name, t: f"{name}  {t} {when(t)}" if i == 0 else name, sample.map, display)


def plan_frames(levels, context, display=128):
    """Yield the frames of a per-level "plan" video: level l decoded on its own, upscaled to level 0's
    size, finest on the left (what each level of the hierarchy has decided, §3.1 / Fig. 5)."""
    return tiled_frames([(f"level {l}", v) for l, v in enumerate(levels)], context,
                        lambda i, name, t: name + ("  context" if t < context else ""), display=display)


def report(out_dir, results, video_ext=".mp4"):
    """Write every output of the evaluation into `out_dir`; returns the path of results.md."""
    summary = summarize(results)
    for name, text in (("results.json", json.dumps(summary, indent=1)), ("results.md", results_markdown(summary))):
        data.atomic_write(os.path.join(out_dir, name), lambda tmp: Path(tmp).write_text(text))
    metrics = [m for m in METRICS if any(m in r.per_frame for r in results.rows)]

    def write_csv(tmp):  # per_frame.csv: one line per (row, video, generated offset), with the video frame index;
        with open(tmp, "w", newline="") as f:  # FID and FVD, one value per offset, on lines of video "all"
            w = csv.writer(f)
            w.writerow(["model", "video", "offset", "frame"] + metrics)
            for r in results.rows:
                K = next(iter(r.per_frame.values())).shape[1] if r.per_frame else 0
                lines = [*enumerate(r.keys)] + [(0, "all")] * bool(set(SET_METRICS) & set(r.per_frame))
                for v, key in lines:  # a metric's value where its kind (per video, or of the set) fits the line
                    w.writerows([r.name, key, k + 1, results.context + k] + [
                        f"{r.per_frame[m][v, k]:.6g}" if m in r.per_frame and (m in SET_METRICS) == (key == "all")
                        else "" for m in metrics] for k in range(K))
    data.atomic_write(os.path.join(out_dir, "per_frame.csv"), write_csv)
    plot_curves(os.path.join(out_dir, "consistency.png"), results, metrics)
    for s in results.samples:
        name = s.key.replace("/", "-")  # keys look like "000/012"
        data.write_video(os.path.join(out_dir, "videos", name + video_ext),
                         side_by_side_frames(s, results.context), results.fps)
        for model, levels in s.plans.items():
            data.write_video(os.path.join(out_dir, "plans", f"{name}-{model}{video_ext}"),
                             plan_frames(levels, results.context), results.fps)
    return os.path.join(out_dir, "results.md")


# ----------------------------------------------------------------------------- the protocol

@dataclass
class Video:
    """One test video as the protocol needs it (`evaluate` reads it from the data.py stores)."""
    frames: np.ndarray                 # np.uint8 (F, H, W, 3) ground truth
    latents: list                      # per level (F, T_l, C) encoded ground truth
    actions: np.ndarray                # int (F,): 0 forward, 1 left, 2 right
    poses: np.ndarray | None = None    # (F, 6) as data.read_actions returns it, for the map
    world: object = None               # maze grid for the map (None for Loopcraft)


@dataclass
class Model:
    """Ready to roll out: generate(latents per level (B, F, T_l, C), actions (B, F), seed) -> latents, >= F frames."""
    name: str
    generate: Callable
    rollout_steps: int | None = None
    network_evals: int | None = None
    trained: str | None = None  # steps, hours and hardware of its training
    strategy: str | None = None  # its rollout strategy (the memory probe pools training seeds by it)
    steps: tuple = ()            # (rollout.Step list, num_clipped): what the probe's bookkeeping follows


def evaluate_videos(cfg, keys, load, decode, models, palette=None, lpips_net=None, draw_map=None,
                    unavailable=None, device="cpu", partner_latents=None, visibility=None, features=None):
    """The protocol over `keys` in batches of cfg.batch_size -> Results (then `report` writes it). load(key) -> Video;
    decode(z (n, T_l, C), level) -> (n, 3, H, W) in [0, 1]; models: [Model]; draw_map(world, poses, split, size) as
    in data.py; partner_latents(key) -> level-0 latents of frames [context, total), all the random-latents row reads
    of its partner video (default: via load); visibility(video) -> (face (F, W), wall (F, H, W), faces per frame)
    turns on the memory probe; features: load_feature_nets' networks. Latents, actions and metrics live on `device`.
    Each model rolls out once per sampling seed, a video's metrics are the mean over seeds (FID / FVD: each seed's
    video one more sample of the set); the first cfg.num_samples videos become samples."""
    c, n = cfg.context, cfg.total  # 0 < c < n: EvalConfig checks it
    partner_latents = partner_latents or (lambda key: load(key).latents[0][c:n])
    buckets, partner = horizon_buckets(n - c, cfg.buckets), derangement(len(keys), cfg.seed)
    values, wall, samples = {}, {m.name: 0.0 for m in models}, []  # values: row -> metric -> [per video (K,)]
    features, why = features or {}, dict(unavailable or {})
    if "fvd" in features and n - c < CLIP:
        why["fvd"], features = f"FVD: not computed (fewer than {CLIP} generated frames)", {
            k: v for k, v in features.items() if k != "fvd"}
    embed = {m: fn for m, fn in (("fid", lambda f: inception_features(features["fid"], f, device)),
                                 ("fvd", lambda f: i3d_features(features["fvd"], f, device))) if m in features}
    embedded = {}  # FID / FVD: row (and "truth") -> metric -> [per video and seed, float16 (K or K // 16, D)]
    plans, progress = {m.strategy: m.steps for m in models}, data.Progress("evaluate: videos", len(keys), every=1)
    for start in range(0, len(keys), cfg.batch_size):
        batch = range(start, min(start + cfg.batch_size, len(keys)))
        videos = [load(keys[i]) for i in batch]
        for i, v in zip(batch, videos):
            if len(v.frames) < n or len(v.latents[0]) < n:
                raise ValueError(f"test video {keys[i]}: {len(v.frames)} frames, evaluation needs total={n}")
        # the models get the context's ground-truth latents only: later frames are zeroed, so nothing leaks
        visible = [torch.from_numpy(np.stack([np.asarray(v.latents[l][:n], np.float32) for v in videos])).to(device)
                   for l in range(len(videos[0].latents))]  # per level (B, F, T_l, C)
        for z in visible:
            z[:, c:] = 0
        # the memory probe: each video's pixel categories, and for MilliVid the swap control: the context frames
        # that show nothing 'seen by all' replaced by the partner video's
        probes = [probe_categories(plans, *visibility(v), c) for v in videos] if visibility else []
        swapped = [z.clone() for z in visible]
        for b, (cat, swap) in enumerate(probes):
            other = load(keys[partner[batch[b]]]).latents
            for l, z in enumerate(swapped):
                z[b, swap] = torch.from_numpy(np.asarray(other[l][swap], np.float32)).to(device)
        actions = torch.from_numpy(np.stack([v.actions[:n] for v in videos])).long().to(device)  # (B, F)
        out = {}
        for m, seed in ((m, seed) for m in models for seed in cfg.sampling_seeds):
            t0 = time.perf_counter()
            out[m.name, seed] = m.generate(visible, actions, seed)
            torch.cuda.synchronize() if torch.cuda.is_available() else None  # (wall time of the work itself)
            wall[m.name] += (time.perf_counter() - t0) / len(cfg.sampling_seeds)
            if (got := len(out[m.name, seed][0][0])) < n:
                raise ValueError(f"model {m.name}: generate returned {got} frames, expected >= {n}")
            if probes and m.strategy == "millivid":
                out[f"{m.name} swap", seed] = m.generate(swapped, actions, seed)
        for b, (i, v) in enumerate(zip(batch, videos)):
            truth = v.frames[c:n]
            frames = {(name, seed): decode_frames(decode, z[0][b, c:n], 0, device) for (name, seed), z in out.items()}
            # reference rows: the video's own latents decoded (upper bound), and its partner video's
            # latents at the same frame indices (real frames, no consistency: a lower bound)
            frames["ground-truth latents", 0] = decode_frames(decode, v.latents[0][c:n], 0, device)
            frames["random latents", 0] = decode_frames(decode, partner_latents(keys[partner[i]]), 0, device)
            for name in dict.fromkeys(name for name, _ in frames):  # a video's metrics: the mean over sampling seeds
                runs = [frame_metrics(f, truth, palette, lpips_net, device, features=features) | (probe_metrics(
                    f, truth, probes[b][0], palette) if probes else {}) for (x, _), f in frames.items() if x == name]
                for metric in runs[0]:
                    values.setdefault(name, {}).setdefault(metric, []).append(np.mean([r[metric] for r in runs], 0))
            for (name, _), f in [(("truth", 0), truth), *frames.items()]:  # set metrics: features now, distances last
                for m, fn in embed.items():  # float16: paper scale holds 1000 x 768 x 2048 per row
                    embedded.setdefault(name, {}).setdefault(m, []).append(fn(f).astype(np.float16))
            if i < cfg.num_samples:  # whole videos: the context as the decoder shows it, then the rollout
                context, first = decode_frames(decode, v.latents[0][:c], 0, device), cfg.sampling_seeds[0]
                plans_ = {m.name: [decode_frames(decode, z[b, :n], l, device) for l, z in enumerate(out[m.name, first])]
                          for m in models if len(out[m.name, first]) > 1}
                mp = None if draw_map is None else (lambda t, v=v: draw_map(v.world, v.poses[:t + 1], c, cfg.map_size))
                shown = {"ground truth": v.frames[:n]} | {m.name: np.concatenate([context, frames[m.name, first]])
                                                          for m in models}
                if probes:  # the probe's categories over the truth: green seen by all, blue MilliVid only, red none
                    tint = np.array([[40, 220, 40], [40, 120, 255], [240, 40, 40]], np.uint8)[probes[b][0]]
                    shown["categories"] = np.concatenate([v.frames[:c], np.where(
                        probes[b][0][..., None] >= 0, truth // 4 + tint // 4 * 3, truth)])
                samples.append(Sample(keys[i], shown, mp, plans_))
        progress.update(len(batch))
    progress.close()
    for name, sets in embedded.items():  # FID per generated frame index, FVD per clip, each over the whole test set
        for m, x in sets.items():
            if name != "truth":
                truth = np.stack(embedded["truth"][m])
                values[name][m] = [set_curve(np.stack(x), truth, n - c, CLIP if m == "fvd" else 1)[0]]
    table = {name: {k: np.stack(x) for k, x in metrics.items()} for name, metrics in values.items()}
    for strategy in dict.fromkeys(m.strategy for m in models if m.strategy):  # training seeds pooled: per video, mean
        names = [m.name for m in models if m.strategy == strategy]
        for suffix in ("", " swap") if len(names) > 1 else ():
            if names[0] + suffix in table:
                table[strategy + suffix] = {k: np.mean([table[x + suffix][k] for x in names], 0)
                                            for k in table[names[0]]}
    cost = {m.name: (m.rollout_steps, m.network_evals, wall[m.name] / len(keys), m.trained) for m in models}
    refs = ("ground-truth latents", "random latents")
    rows = [Row(name, t, list(keys), False, *cost.get(name, ())) for name, t in table.items() if name not in refs]
    rows += [Row(name, table[name], list(keys), True) for name in refs]
    why |= {m: f"{METRICS[m][0]}: unavailable (needs weights: {' + '.join(FEATURES[m][1])} and the packages of "
            "requirements-metrics.txt; README: Feature metrics)" for m in FEATURES if m not in features | why}
    if palette is None:
        why["maze"] = "maze colour: not computed (no palette of base colours: Loopcraft has none)"
    return Results(rows, c, buckets, samples, why, dataclasses.asdict(cfg), cfg.fps)


def pipeline(cfg, preset, device, decode_with):
    """Our pipeline folder (what `train.py --stage all` writes): the test split ({root}/data/test,
    {root}/latents/test), the autoencoder ({root}/ae) and every model in cfg.models ({root}/video-<name>)
    rebuilt from their checkpoints alone. -> the Source of evaluate()."""
    frames_dir, latents_dir = f"{cfg.root}/data/test", f"{cfg.root}/latents/test"
    ae = tokenizer.HierarchicalAutoencoder.from_checkpoint(f"{cfg.root}/ae", device)
    made_by = tokenizer.sha256(ae.source)  # the test latents: complete, made by the autoencoder that decodes here
    meta = f"{latents_dir}/meta.json"
    if not os.path.exists(f"{latents_dir}/index.json") or json.load(open(meta)).get("ae_sha256") != made_by:
        raise SystemExit(f"{latents_dir}: test latents missing, incomplete or encoded by another autoencoder than "
                         f"{ae.source}, which decodes here; (re-)encode them: python train.py --stage encode")

    def load(key):  # a test video from the data.py stores: frames, every level's latents, actions, map data
        poses = data.read_actions(frames_dir, key)[:cfg.total]  # (F, 6): action id, x, y, z, yaw, pitch
        return Video(data.read_frames(frames_dir, key, 0, cfg.total),
                     [tokenizer.read_latents(latents_dir, key, l, 0, cfg.total) for l in range(len(ae.grids))],
                     poses[:, 0].astype(np.int64), poses, data.load_world(frames_dir, key))

    nets = []
    for strategy, seed in ((s, k) for k in cfg.train_seeds for s in cfg.models):
        name = strategy if len(cfg.train_seeds) == 1 else f"{strategy} seed {seed}"
        net = diffusion.VideoDiT.from_checkpoint(video_folder(cfg.root, strategy, seed), device)
        record = tokenizer.read_checkpoint(net.source, "video")  # its config, step, training time (memory-mapped)
        if record["config"].get("latents_ae_sha256") != made_by:  # latents of another autoencoder: unreadable here
            raise SystemExit(f"{net.source}: trained on latents of another autoencoder than {ae.source}; retrain it: "
                             f"python train.py --stage video --strategy={strategy} --seed={seed}")
        s, on = round(record.get("seconds", 0)), record.get("device", "?")  # training wall time as h:mm:ss
        nets.append((name, strategy, net, rollout.RolloutConfig(**record["config"]["rollout"]),
                     f"{record['step']} steps in {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} on {on}"))
    meta = json.load(open(f"{frames_dir}/meta.json"))
    palette = data.PALETTE if meta.get("source") == "maze" else None

    def visibility(v):  # the memory probe: the maze's ray caster says which wall face each column shows
        frames, face, wall = data.render(v.world, v.poses, meta["size"], meta["config"]["fov"], faces=True)
        if not np.array_equal(frames, v.frames):  # the bookkeeping must describe these very frames
            raise ValueError(f"{frames_dir}: its frames are not what data.py renders now; regenerate the store")
        return face, wall, [set(row.tolist()) for row in face]
    return dict(ae=ae, keys=sorted(data.load_index(frames_dir))[:cfg.num_videos], load=load, nets=nets,
                palette=palette, visibility=visibility if palette is not None else None, notes={},
                partner=lambda key: tokenizer.read_latents(latents_dir, key, 0, cfg.context, cfg.total))


# the authors' release, as the README says to lay it out (Hugging Face charatan/millivid and datasets/charatan/
# loopcraft; never downloaded here); frames/: optional, `python data.py prepare` of the Loopcraft test videos
OFFICIAL = {"ae": "autoencoder_3zg3ovzdhnun_128000.ckpt", "millivid": "millivid_192k.ckpt",
            "framepack": "framepack_192k.ckpt", "fullres": "full_resolution_rollout_192k.ckpt",
            "latents": "test_latents_3zg3ovzdhnun_128000"}


def official(cfg, preset, device, decode_with):
    """The authors' released models in cfg.official, run by our code: their autoencoder, video checkpoints and
    test latents (.pyramid), with the architectures and rollouts of `preset` (theirs: paper); the ground truth
    is frames/ when present, else the decoded ground-truth latents stand in for it (the report says so)."""
    root, bad = cfg.official, [m for m in cfg.models if m not in ("millivid", "framepack", "fullres")]
    if bad:
        raise ValueError(f"--models: the authors released millivid, framepack and fullres; {bad[0]} is ours only")
    for part in ["ae", "latents", *cfg.models]:
        if not os.path.exists(f"{root}/{OFFICIAL[part]}"):
            raise FileNotFoundError(f"{root}/{OFFICIAL[part]}: missing; download the authors' release as the README "
                                    "says (The authors' models): it is never downloaded here")
    ae = tokenizer.from_official(f"{root}/{OFFICIAL['ae']}", tokenizer.ae_config(preset)).to(device)
    latents, decode = f"{root}/{OFFICIAL['latents']}", decode_with(ae)
    index = [f"{latents}/{f}" for f in ("index.json", "index_unfiltered.json") if os.path.exists(f"{latents}/{f}")]
    index = json.load(open(index[0])) if index else {}  # {key: frames}
    keys = sorted(k for k, n in index.items() if n >= cfg.total and os.path.exists(f"{latents}/{k}.pyramid"))
    if len(keys) < 2:
        raise ValueError(f"{latents}: {len(keys)} test videos of >= {cfg.total} frames listed in its index.json with "
                         "their .pyramid file; the protocol needs at least 2")
    frames = f"{root}/frames" if os.path.exists(f"{root}/frames/index.json") else None

    def load(key):  # (F, 6) float32 MineRL poses [action, x, y, z, yaw, pitch] ride along with the latents
        z, poses = tokenizer.read_pyramid(f"{latents}/{key}.pyramid", ae.grids, ae.cfg.channels)
        z, poses = [l[:cfg.total] for l in z], poses[:cfg.total]
        truth = data.read_frames(frames, key, 0, cfg.total) if frames else decode_frames(decode, z[0], 0, device)
        return Video(truth, z, poses[:, 0].astype(np.int64), poses)
    nets = [(m, m, diffusion.from_official(f"{root}/{OFFICIAL[m]}", diffusion.dit_config(
        preset, dense=m == "framepack")).to(device), rollout.rollout_config(preset, strategy=m),
        "the authors' release (192k steps on 8 x H200)") for m in cfg.models]
    notes = {} if frames else {"truth": f"ground truth: {root}/frames/ (a data.py store of the Loopcraft test videos) "
                               "is absent, so the decoded ground-truth latents stand in for the frames"}
    return dict(ae=ae, keys=keys[:cfg.num_videos], load=load, nets=nets, palette=None, visibility=None, notes=notes,
                partner=lambda key: tokenizer.read_pyramid(f"{latents}/{key}.pyramid", ae.grids, ae.cfg.channels)
                [0][0][cfg.context:cfg.total])


def evaluate(cfg, preset="paper"):
    """The whole protocol on our pipeline folder, or on the authors' release (cfg.official, with `preset`'s
    architectures). Returns the path of results.md."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def decode_with(ae):  # one level on its own, every other level zeroed (§3.1); level-0 image out
        def decode(z, level):
            with autocast:
                return ae.decode([z if l == level else None for l in range(len(ae.grids))], level)[0].float()
        return decode

    source = (official if cfg.official else pipeline)(cfg, preset, device, decode_with)
    grids = [list(g) for g in source["ae"].grids]
    T0 = grids[0][0] * grids[0][1]

    def rollout_of(net, steps, clipped):  # Model.generate: rollout.py's loop, the same noise for every model
        def generate(latents, actions, seed):
            with autocast:
                return rollout.generate(net, steps, latents, actions, cfg.context, cfg.total, grids,
                                        dense=net.cfg.dense, num_clipped=clipped, sampling_steps=cfg.sampling_steps,
                                        cfg_scale=cfg.cfg_scale, generator=torch.Generator(device).manual_seed(seed))
        return generate

    models = []
    for name, strategy, net, roll, trained in source["nets"]:
        if cfg.compile and device.type == "cuda":  # each rollout step's shapes are static: one graph per step kind
            net.compile(mode="reduce-overhead")
        steps, clipped = rollout.strategy_steps(roll, T0)
        cost = rollout.figures(steps, T0, cfg.context, cfg.total, clipped, net.cfg.dense, cfg.sampling_steps)
        models.append(Model(name, rollout_of(net, steps, clipped), cost["rollout_steps"],  # CFG: twice the evaluations
                            cost["nfe"] * (1 if cfg.cfg_scale == 1 else 2), trained, strategy, (steps, clipped)))
    lpips_net, why = tokenizer.lpips_net("alex") if cfg.lpips else (None, "LPIPS: switched off (--lpips=false)")
    features, missing = load_feature_nets(cfg.metric_weights, cfg.features, source["ae"].cfg.image_size, device)
    notes = source["notes"] | ({"lpips": why} if why else {}) | missing | {
        m: f"{METRICS[m][0]}: switched off (--features)" for m in FEATURES if m not in cfg.features}
    results = evaluate_videos(cfg, source["keys"], source["load"], decode_with(source["ae"]), models,
                              source["palette"], lpips_net, data.draw_map, notes, device, source["partner"],
                              source["visibility"], features)
    results.config["git_commit"] = tokenizer.git_commit()
    return report(cfg.out or (f"{cfg.official}/eval" if cfg.official else f"{cfg.root}/eval"), results)


if __name__ == "__main__":  # python evaluate.py --preset toy [--root=runs/toy] [--key=value ...]
    import sys
    overrides = data.parse_overrides([a for a in sys.argv[1:] if a not in ("-h", "--help")])
    preset = overrides.pop("preset", "toy")
    if {"-h", "--help"} & set(sys.argv):
        raise SystemExit(print(f"{__doc__}\nsettings (--key=value) with their --preset {preset} values:\n"
                               + describe(eval_config(preset))))
    try:
        print(evaluate(eval_config(preset, **{"root": f"runs/{preset}", **overrides}), preset))
    except (ValueError, OSError) as e:  # a bad setting, a missing checkpoint or store: one line
        raise SystemExit(f"error: {e}") from None
