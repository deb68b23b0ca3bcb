"""Tests for diffusion.py: parameter counts (App. A.2), schedule identities, exact DDIM, invariances,
the DENOISED-only loss, CFG dropout, and overfitting one sequence for each kind of rollout step.
Steps and their token layouts come from rollout.py."""
import math

import numpy as np
import pytest
import torch

import diffusion as d
import rollout
from rollout import CONTEXT, DENOISED

TINY = d.dit_config("tiny")                            # C 8, 3 levels, level-0 grid 4x4
TINY_DENSE = d.dit_config("tiny", dense=True)  # the dense FramePack model
GRIDS = [(4, 4), (2, 2), (1, 1)]


def layout(step, dense=False):
    out = {k: torch.from_numpy(v) for k, v in rollout.step_layout(step.selection, GRIDS, dense).items()}
    return out | {"denoised": out["role"] == DENOISED}  # what loss and ddim_sample take


def millivid_step():
    """Tiny MilliVid (W = [1, 4, 16], extra 16, chunk 37), its first step (target level 2). By hand (the
    worked example of rollout.millivid_steps): L0 context frame 20; L1 context 16-19; L2 context 0-15
    (extra) and denoised 21-36."""
    step = rollout.millivid_steps([1, 4, 16], extra_budget=16, tokens_per_frame=16)[0]
    assert [np.flatnonzero(sel).tolist() for sel in step.selection] == [
        [20], [16, 17, 18, 19], list(range(16)) + list(range(21, 37))]
    return layout(step)  # 16 + 16 + 32 = 64 tokens


def fullres_step():
    """Full-resolution rollout n = 4: 2 context + 2 denoised level-0 frames (64 tokens)."""
    return layout(rollout.fullres_steps(4)[0])


def framepack_step():
    """Dense FramePack d = 1, K = [1, 4, 16]: group 2 frames 0-15, group 1 frames 16-19, group 0 frame 20
    as context, frame 21 denoised. 22 x 16 = 352 raw level-0 tokens, 16 + 16 + 32 = 64 after packing."""
    return layout(rollout.framepack_steps(1, [1, 4, 16])[0], dense=True)


def randomized(cfg, seed=0):
    """A model with every weight random (no zeroed adaLN / output), so outputs depend on everything."""
    torch.manual_seed(seed)
    model = d.VideoDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def call(model, x, step, action, t=None, **shift):
    t = torch.rand(x.shape[0], 2, generator=torch.Generator().manual_seed(1)) if t is None else t  # (B, 2)
    frame = step["frame"] + shift.get("frame", 0)
    return model(x, t, step["denoised"], frame, step["level"], step["row"], step["col"], action)


# ---------------------------------------------------------------------------------------------------

def test_parameter_counts_match_paper():
    with torch.device("meta"):
        dit = d.VideoDiT(d.dit_config("paper"))
        dense = d.VideoDiT(d.dit_config("paper", dense=True))
    n_dit = sum(p.numel() for p in dit.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert abs(n_dit / 129.6e6 - 1) < 0.01, n_dit      # DiT-B, App. A.2
    assert abs(n_dense / 131.6e6 - 1) < 0.01, n_dense  # FramePack baseline
    # the only difference: Linear(C 4^k -> D) for k = 1, 2, 3 on top of the shared k = 0 embedding
    assert n_dense - n_dit == 32 * (4 + 16 + 64) * 768 + 3 * 768


def test_config_presets_and_strict_overrides():
    assert (d.DiTConfig().depth, d.DiTConfig().width, d.DiTConfig().heads, d.DiTConfig().channels) == (12, 768, 12, 32)
    assert (d.dit_config("toy").channels, d.dit_config("toy").levels) == (16, 4)
    assert d.dit_config("toy").width % 6 == 0 and (TINY.channels, TINY.levels) == (8, 3)
    assert d.dit_config("tiny", depth=3).depth == 3
    assert TINY_DENSE.dense and not TINY.dense
    for bad, match in [(dict(widht=48), "widht"), (dict(width=48.0), "width"), (dict(width=49), "width"),
                       (dict(width=10, heads=1), "width"), (dict(strategy="millivid"), "strategy")]:  # the strategy is rollout.RolloutConfig's
        with pytest.raises(ValueError, match=match):
            d.dit_config("tiny", **bad)
    with pytest.raises(ValueError, match="preset"):
        d.dit_config("huge")


@pytest.mark.parametrize("preset,T0,budgets", [("paper", 256, (3840, 3840, 3584)), ("toy", 64, (320, 320, 320)),
                                               ("tiny", 16, (64, 64, 64))])
def test_preset_rollout_budgets(preset, T0, budgets):
    """Each preset's strategies give its tokens per step at equal budget (App. A.2), for its DiT's levels."""
    cfg = rollout.rollout_config(preset)
    assert len(cfg.frames_per_level) == len(cfg.framepack_context) == d.dit_config(preset).levels
    assert rollout.preset_frames(preset)[0] == T0

    def tokens(steps, dense=False):
        return {int(rollout.level_tokens(s.selection, T0, dense).sum()) for s in steps}
    assert tokens(rollout.millivid_steps(cfg.frames_per_level, cfg.extra_budget, T0)) == {budgets[0]}
    assert tokens(rollout.framepack_steps(cfg.framepack_denoised, cfg.framepack_context), dense=True) == {budgets[1]}
    assert tokens(rollout.fullres_steps(cfg.fullres_frames)) == {budgets[2]}


def test_schedule_identities():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, sigma = d.alpha_sigma(t)
    assert torch.allclose(alpha ** 2 + sigma ** 2, torch.ones_like(t), atol=1e-12, rtol=0)
    lam = d.logsnr(t)
    assert lam[0].item() == pytest.approx(15.0, abs=1e-9) and lam[-1].item() == pytest.approx(-15.0, abs=1e-9)
    # u_min + u_max = pi/2, so t = 1/2 is u = pi/4: logSNR 0, alpha = sigma = sqrt(1/2)
    assert lam[50].item() == pytest.approx(0.0, abs=1e-12) and alpha[50].item() == pytest.approx(math.sqrt(0.5))
    assert (lam[1:] < lam[:-1]).all()  # monotone: more noise as t grows
    for s in (0.25, 2.0, 4.0):  # shift moves logSNR by 2 ln s everywhere
        assert torch.allclose(d.logsnr(t, shift=s) - lam, torch.full_like(t, 2 * math.log(s)), atol=1e-12)
    a32, s32 = d.alpha_sigma(t.float())
    assert torch.allclose(a32 ** 2 + s32 ** 2, torch.ones(101), atol=1e-6)


def oracle(x0):
    """A 'model' that returns the true v for the clean x0: v = (alpha x_t - x0) / sigma (from x_t = alpha x0
    + sigma eps and v = alpha eps - sigma x0, with alpha^2 + sigma^2 = 1)."""
    def model(x_t, t, denoised, frame, level, row, col, action, packing=None):
        alpha, sigma = (a[..., None] for a in d.alpha_sigma(d.token_times(t, denoised).to(x_t.dtype)))
        return (alpha * x_t - x0) / sigma
    return model


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("steps", [1, 50])
@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])  # with an oracle both CFG passes give the true v
def test_sampler_is_exact_with_true_v(dtype, tol, steps, cfg_scale):
    step = millivid_step()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 64, TINY.channels, generator=g, dtype=dtype)
    buffer = torch.where((step["role"] == DENOISED)[:, None], 100.0, x0)  # DENOISED content is ignored
    action = torch.randint(0, 3, (2, 64), generator=g)
    out = d.ddim_sample(oracle(x0), buffer, step["denoised"], step["frame"], step["level"], step["row"], step["col"],
                        action, steps=steps, cfg_scale=cfg_scale, generator=g)
    assert (out - x0).abs().max().item() < tol


def test_sampler_time_grid_and_cfg_pass():
    step, calls = millivid_step(), []

    def recorder(x_t, t, denoised, frame, level, row, col, action, packing=None):
        calls.append((d.token_times(t, denoised), action.clone()))
        return torch.zeros_like(x_t)

    context, denoised = step["role"] == CONTEXT, step["role"] == DENOISED
    action = torch.ones(1, 64, dtype=torch.long)
    x = torch.randn(1, 64, TINY.channels)
    d.ddim_sample(recorder, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action,
                  steps=4)
    assert [c[0][0, denoised].unique().tolist() for c in calls] == [[1.0], [0.75], [0.5], [0.25]]
    assert all((c[0][0, context] == 0).all() and (c[1] == 1).all() for c in calls)
    calls.clear()
    d.ddim_sample(recorder, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action,
                  steps=4, cfg_scale=1.5)
    uncond = calls[1::2]  # conditional, then unconditional pass at every time
    assert len(calls) == 8 and all((c[0][0, context] == 1).all() and (c[1] == -1).all() for c in uncond)


def test_ddim_step_is_a_rotation():
    """With alpha = cos(phi), sigma = sin(phi), one DDIM step from t to t' is
    x_t' = cos(phi - phi') x_t - sin(phi - phi') v (Salimans & Ho 2022): check it against the model inputs,
    for a stand-in model that always returns the same v = V."""
    step, inputs = millivid_step(), []
    g = torch.Generator().manual_seed(0)
    V = torch.randn(1, 64, TINY.channels, generator=g, dtype=torch.float64)

    def constant(x_t, t, denoised, frame, level, row, col, action, packing=None):
        inputs.append(x_t.clone())
        return V

    x = torch.randn(1, 64, TINY.channels, generator=g, dtype=torch.float64)
    out = d.ddim_sample(constant, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"],
                        torch.zeros(64, dtype=torch.long), steps=5, generator=g)
    alpha, sigma = d.alpha_sigma(torch.linspace(1, 0, 6, dtype=torch.float64))
    phi = torch.atan2(sigma, alpha)
    denoised = step["role"] == DENOISED
    for i in range(4):
        expected = torch.cos(phi[i] - phi[i + 1]) * inputs[i] - torch.sin(phi[i] - phi[i + 1]) * V
        assert torch.allclose(inputs[i + 1][:, denoised], expected[:, denoised], atol=1e-12)
    # the result is the last clean estimate x = alpha x_t - sigma v, at the last evaluated time t = 1/5
    assert torch.allclose(out[:, denoised], (alpha[4] * inputs[4] - sigma[4] * V)[:, denoised], atol=1e-12)


def test_sampler_leaves_context_untouched_and_ignores_denoised_input():
    step, model = millivid_step(), randomized(TINY)
    x = torch.randn(2, 64, TINY.channels)
    action = torch.randint(0, 3, (2, 64))
    context = step["role"] == CONTEXT

    def sample(x, scale):
        return d.ddim_sample(model, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"],
                             action, steps=3, cfg_scale=scale, generator=torch.Generator().manual_seed(0))
    for scale in (1.0, 2.0):
        out = sample(x, scale)
        assert torch.equal(out[:, context], x[:, context])
        assert not torch.allclose(out[:, ~context], x[:, ~context])
        # what the buffer holds at DENOISED positions never reaches the result
        assert torch.equal(sample(torch.where(context[:, None], x, 100.0), scale), out)


def test_conditioning_is_the_per_token_sum():
    """c = timestep_embedding(t) + level_embedding(level) + action_embedding(action), action -1 -> 0 vector:
    a static table of every (sample, role, level, action), indexed back to every token."""
    model, g = randomized(TINY), torch.Generator().manual_seed(0)
    t, denoised = torch.rand(3, 2, generator=g), torch.rand(3, 64, generator=g) < 0.5  # (B, 2), (B, T)
    level, action = torch.randint(0, 3, (3, 64), generator=g), torch.randint(-1, 3, (3, 64), generator=g)
    with torch.no_grad():
        c, index = model.conditioning(t, denoised, level, action)
        a = torch.where((action >= 0)[..., None], model.action_embed(action.clamp(min=0)), 0.0)
        t_token = d.token_times(t, denoised)
        per_token = model.t_embed(d.timestep_embedding(t_token.flatten())).view(3, 64, -1) + model.level_embed(level) + a
    assert c.shape == (3 * 2 * 3 * 4, TINY.width) and torch.allclose(c[index], per_token, atol=1e-6)


def test_modulation_is_fp32_under_bf16_autocast(monkeypatch):
    """Each modulation row is shared by many tokens: under bf16 autocast the rows, their per-token gather and
    the rows' gradients (the gather's backward sums thousands of tokens into a row) stay fp32."""
    step, model = millivid_step(), randomized(TINY)
    rows, grads, gathered, per_token = [], [], [], d.tokenizer.per_token

    def hook(module, inputs, out):
        rows.append(out.dtype)
        out.register_hook(lambda g: grads.append(g.dtype))

    def recording(r, index=None):
        gathered.append(per_token(r, index).dtype)
        return per_token(r, index)
    for m in [model.final.adaLN_modulation] + [b.adaLN_modulation for b in model.blocks]:
        m.register_forward_hook(hook)
    monkeypatch.setattr(d.tokenizer, "per_token", recording)
    monkeypatch.setattr(d, "per_token", recording)
    x = torch.randn(2, len(step["frame"]), TINY.channels)
    with torch.autocast("cpu", torch.bfloat16):
        v = call(model, x, step, torch.zeros(len(step["frame"]), dtype=torch.long))
    v.float().pow(2).mean().backward()
    assert rows == grads == [torch.float32] * (TINY.depth + 1)
    assert gathered == [torch.float32] * (6 * TINY.depth + 2)


@pytest.mark.parametrize("cfg,step", [(TINY, millivid_step), (TINY_DENSE, framepack_step)])
def test_output_is_zero_at_init(cfg, step):
    step = step()
    x = torch.randn(2, len(step["frame"]), cfg.channels)
    v = call(d.VideoDiT(cfg), x, step, torch.randint(-1, 3, (2, len(step["frame"]))))
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(v))


@pytest.mark.parametrize("cfg,step", [(TINY, millivid_step), (TINY_DENSE, framepack_step)])
def test_frame_shift_invariance(cfg, step):
    step, model = step(), randomized(cfg)
    T = len(step["frame"])
    x = torch.randn(2, T, cfg.channels)
    action = torch.randint(-1, 3, (2, T))
    with torch.no_grad():
        v = call(model, x, step, action)
        assert v.abs().mean() > 0.1
        assert torch.allclose(call(model, x, step, action, frame=1000), v, atol=1e-6)
        # control: positions do matter, so the check above could fail
        stretched = dict(step, frame=2 * step["frame"])
        assert not torch.allclose(call(model, x, stretched, action), v, atol=1e-3)


@pytest.mark.parametrize("cfg,step", [(TINY, millivid_step), (TINY_DENSE, framepack_step)])
def test_residual_stream_is_float32_under_bf16_autocast(cfg, step):
    """Only Linears and attention run in bf16: block inputs and outputs stay fp32 (App. A.2 bf16 AMP)."""
    step, model, dtypes = step(), randomized(cfg), []
    for block in model.blocks:
        block.register_forward_hook(lambda m, inputs, out: dtypes.append((inputs[0].dtype, out.dtype)))
    x = torch.randn(1, len(step["frame"]), cfg.channels)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        call(model, x, step, torch.zeros(len(step["frame"]), dtype=torch.long))
    assert dtypes == [(torch.float32, torch.float32)] * cfg.depth


def test_space_to_depth_by_hand():
    # one 4x4 frame of 2 channels: channel 0 = 4 row + col, channel 1 = 100 + 4 row + col
    a = torch.stack([torch.arange(16.0), 100 + torch.arange(16.0)], -1).view(1, 16, 2)
    packed = d.space_to_depth(a, frames=1, h=4, w=4, p=2)
    # channel-major (c, ph, pw), as the authors' `b f c (h ph) (w pw) -> b f h w (c ph pw)`
    assert packed.squeeze(0).tolist() == [[0, 1, 4, 5, 100, 101, 104, 105], [2, 3, 6, 7, 102, 103, 106, 107],
                                          [8, 9, 12, 13, 108, 109, 112, 113], [10, 11, 14, 15, 110, 111, 114, 115]]


def test_fixed_tables_by_hand():
    """The authors' tables, written out: 3D positions with width//6 frequencies 10000^(-i/(width//6-1)) per
    axis in (frame, row, col) order and zero padding; time features with exponents i/(half-1)."""
    frame, row, col = torch.tensor([[5]]), torch.tensor([[2]]), torch.tensor([[3]])
    pe = d.sincos_3d(frame, row, col, 20)[0, 0]  # 20 // 6 = 3 frequencies: 1, 0.01, 0.0001; 2 zeros of padding
    w = torch.tensor([1.0, 1e-2, 1e-4])
    expect = torch.cat([torch.cat([(p * w).sin(), (p * w).cos()]) for p in (5.0, 2.0, 3.0)] + [torch.zeros(2)])
    torch.testing.assert_close(pe, expect)
    t = torch.tensor([0.25])
    f = torch.tensor([10000.0 ** -(i / 3) for i in range(4)])  # half = 4: exponents 0, 1/3, 2/3, 1
    torch.testing.assert_close(d.timestep_embedding(t, dim=8)[0], torch.cat([(250 * f).cos(), (250 * f).sin()]))


def test_dense_framepack_uses_packed_context_and_predicts_only_group_0():
    step, model = framepack_step(), randomized(TINY_DENSE)
    x = torch.randn(1, 352, TINY.channels)
    action = torch.zeros(1, 352, dtype=torch.long)
    with torch.no_grad():
        v = call(model, x, step, action)
        group0 = step["level"] == 0
        assert torch.equal(v[:, ~group0], torch.zeros_like(v[:, ~group0])) and v[:, group0].abs().min() > 0
        for i, k in ((40, 1), (300, 2)):  # level-major layout: group 0 is tokens 0-31, 1 is 32-95, 2 is 96-351
            x2 = x.clone()
            x2[0, i] += 1.0
            assert step["level"][i] == k and not torch.allclose(call(model, x2, step, action)[:, group0], v[:, group0])
        with pytest.raises(ValueError, match="level-major"):
            call(model, x, {k: val.flip(0) for k, val in step.items()}, action)


def test_loss_counts_only_denoised_tokens():
    step = millivid_step()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 64, TINY.channels, generator=g, dtype=torch.float64)
    denoised = step["role"] == DENOISED
    delta = 0.5

    def model(x_t, t, denoised_, frame, level, row, col, action, packing=None):
        v = oracle(x0)(x_t, t, denoised_, frame, level, row, col, action)
        v = torch.where(denoised[:, None], v, 1e3)  # garbage on every CONTEXT token
        v[0, int(denoised.nonzero()[0]), 0] += delta  # one error on one DENOISED channel
        return v

    args = (x0, step["denoised"], step["frame"], step["level"], step["row"], step["col"],
            torch.zeros(64, dtype=torch.long))
    for drop in (0.0, 1.0):
        value = d.loss(model, *args, cfg_drop=drop, generator=torch.Generator().manual_seed(1)).item()
        # mean over the C channels of one token, then over the 2 x 32 DENOISED tokens
        assert value == pytest.approx(delta ** 2 / TINY.channels / (2 * int(denoised.sum())), rel=1e-9)


@pytest.mark.parametrize("dense", [False, True])
def test_loss_times_and_cfg_dropout(dense):
    step, seen = framepack_step() if dense else millivid_step(), {}
    T = len(step["frame"])

    def recorder(x_t, t, denoised, frame, level, row, col, action, packing=None):
        seen.update(t=d.token_times(t, denoised.expand(x_t.shape[:2])), action=action)
        return torch.zeros_like(x_t)
    recorder.cfg = TINY_DENSE if dense else TINY

    context, denoised = step["role"] == CONTEXT, step["role"] == DENOISED
    x = torch.randn(4, T, TINY.channels)
    action = torch.full((4, T), 2)
    args = (x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action)
    d.loss(recorder, *args, cfg_drop=0.0, generator=torch.Generator().manual_seed(0))
    t = seen["t"][:, denoised]
    assert (seen["t"][:, context] == 0).all() and (seen["action"] == 2).all()
    assert (t == t[:, :1]).all() and len(t[:, 0].unique()) == 4  # one t per sample, shared by its tokens
    d.loss(recorder, *args, cfg_drop=1.0, generator=torch.Generator().manual_seed(0))
    assert (seen["t"][:, context] == 1).all() and (seen["t"][:, denoised] == t).all()
    assert (seen["action"] == (2 if dense else -1)).all()  # the dense FramePack model keeps its actions


def test_bad_inputs_are_named():
    step, model = millivid_step(), d.VideoDiT(TINY)
    x = torch.randn(1, 64, TINY.channels)
    # checked on the device (no host sync): a RuntimeError, at once on a CPU, asynchronously on a GPU
    with pytest.raises(RuntimeError, match="action"):
        call(model, x, step, torch.full((1, 64), 3))  # tiny has actions 0, 1, 2
    with pytest.raises(RuntimeError, match="level"):
        call(model, x, dict(step, level=step["level"] + 1), torch.zeros(1, 64, dtype=torch.long))
    with pytest.raises(RuntimeError, match="group k = 0"):  # a hierarchical step given to the dense model
        d.loss(d.VideoDiT(TINY_DENSE), x, step["denoised"], step["frame"], step["level"], step["row"], step["col"],
               torch.zeros(64, dtype=torch.long))


@pytest.mark.parametrize("cfg,step", [(TINY, millivid_step), (TINY, fullres_step), (TINY_DENSE, framepack_step)])
def test_overfits_one_sequence(cfg, step):
    """One fixed training batch (tokens, t, eps: the generator is re-seeded every iteration) is fitted."""
    step = step()
    torch.manual_seed(0)
    model = d.VideoDiT(cfg)
    x = torch.randn(1, len(step["frame"]), cfg.channels).expand(4, -1, -1)  # one sequence, 4 noise levels
    action = torch.randint(0, 3, (len(step["frame"]),))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        value = d.loss(model, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action,
                       cfg_drop=0.0, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < losses[0] / 10, losses[::10]


def test_train_flops_matches_torch_flop_counter():
    """The MFU numerator of `bench`: its Linear part agrees with torch's FLOP counter on a real training
    step (which does not count CPU attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    step, model, B = millivid_step(), d.VideoDiT(TINY), 16
    x, action = torch.randn(B, 64, TINY.channels), torch.randint(0, 3, (B, 64))
    with FlopCounterMode(display=False) as counter:
        d.loss(model, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action,
               generator=torch.Generator().manual_seed(0)).backward()
    attention = 3 * B * 64 * TINY.depth * 4 * 64 * TINY.width  # QK^T and AV, forward + 2x backward
    assert counter.get_total_flops() == pytest.approx(d.train_flops(TINY, B, 64) - attention, rel=0.01)


# ----------------------------------------------------------------------------------------------------
# Static shapes: no host sync, no graph break (what --compile and CUDA graphs need)

STRATEGY_STEPS = {"millivid": (TINY, millivid_step), "fullres": (TINY, fullres_step),
                  "framepack": (TINY_DENSE, framepack_step)}


def packing_of(cfg):  # the dense step's shapes, as the host knows them before the step (rollout.dense_packing)
    return rollout.dense_packing(rollout.framepack_steps(1, [1, 4, 16])[0], GRIDS) if cfg.dense else None


@pytest.mark.parametrize("strategy", STRATEGY_STEPS)
def test_no_graph_break_in_the_loss_and_a_ddim_step(strategy):
    """torch._dynamo traces one training forward + loss and one DDIM step of every strategy as one graph each:
    nothing in them waits for the host (no .item(), .tolist(), torch.unique or data-dependent shapes)."""
    cfg, make = STRATEGY_STEPS[strategy]
    step, model = make(), randomized(cfg)
    T = len(step["frame"])
    x, action = torch.randn(2, T, cfg.channels), torch.randint(0, 3, (2, T))
    args = (x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action)
    packing = packing_of(cfg)
    eps = torch.randn(x.shape)  # a DDIM step's noise is drawn outside (a torch.Generator breaks graphs)
    for fn in (lambda *a: d.loss(model, *a, packing=packing),
               lambda *a: d.ddim_sample(model, *a, steps=1, packing=packing, eps=eps)):
        explained = torch._dynamo.explain(fn)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_forward_matches_eager():
    """torch.compile(fullgraph=True) of the video DiT (a graph break would fail it) computes what eager does."""
    step, model = millivid_step(), randomized(TINY)
    T = len(step["frame"])
    args = (torch.randn(2, T, TINY.channels), torch.rand(2, 2), step["denoised"], step["frame"], step["level"],
            step["row"], step["col"], torch.randint(-1, 3, (2, T)))
    torch._dynamo.reset()
    with torch.no_grad():
        compiled, eager = torch.compile(model, fullgraph=True)(*args), model(*args)
    assert (compiled - eager).norm() / eager.norm() < 1e-5  # float reassociation only


def saved_bytes(cfg, checkpointing, B=4):
    """Bytes autograd keeps for backward in one bf16-autocast training step of a MilliVid step (weights and their
    casts left out: they are counted as parameters)."""
    model, step = d.VideoDiT(cfg), millivid_step()
    model.checkpointing = checkpointing
    T, seen = len(step["frame"]), {}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}

    def keep(t):
        if tuple(t.shape) not in shapes:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    x, action = torch.randn(B, T, cfg.channels), torch.randint(0, 3, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        d.loss(model, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action)
    return sum(seen.values()), B * T * cfg.width


@pytest.mark.parametrize("depth", [2, 4])
def test_train_memory_is_what_backward_keeps(depth):
    """train_memory's activations are what autograd keeps (within 5%); with checkpointing, the blocks' fp32 inputs
    plus, during backward, one block recomputed."""
    cfg = d.dit_config("tiny", width=96, depth=depth, heads=2)
    params = 16 * sum(p.numel() for p in d.VideoDiT(cfg).parameters())
    kept, unit = saved_bytes(cfg, False)
    assert kept == pytest.approx(d.train_memory(cfg, 4, 64) - params, rel=0.05)
    kept, unit = saved_bytes(cfg, True)
    assert kept + d.SAVED_PER_BLOCK * unit == pytest.approx(d.train_memory(cfg, 4, 64, True) - params, rel=0.05)


def test_checkpointing_gives_the_same_gradients():
    step, model = millivid_step(), randomized(TINY)
    x, action = torch.randn(2, 64, TINY.channels), torch.randint(0, 3, (2, 64))
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        model.zero_grad()
        d.loss(model, x, step["denoised"], step["frame"], step["level"], step["row"], step["col"], action,
               generator=torch.Generator().manual_seed(0)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
