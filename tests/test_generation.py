"""The generation loop's bookkeeping is exact: with an oracle model that returns the true v of the
ground-truth latents, every strategy regenerates the ground truth over several chunks (including an
overshooting last chunk), and every CONTEXT token it is shown is ground truth that was available."""
import pytest
import torch

import rollout
from diffusion import DiTConfig, alpha_sigma, token_times


class Oracle(torch.nn.Module):
    """Returns v = (α x_t − x) / σ for the true clean x of each token (so DDIM's x̂ = α x_t − σ v = x),
    and checks that every CONTEXT token it sees is the ground truth (x_t at t = 0 is x within σ(0)·ε)."""

    def __init__(self, truth, grids, dense):
        super().__init__()
        self.truth, self.grids, self.dense = truth, grids, dense
        self.cfg = DiTConfig(dense=dense)  # ddim_sample reads keep_actions from it
        self.calls = 0

    def forward(self, x_t, t, denoised, frame, level, row, col, action, packing=None):
        self.calls += 1
        t = token_times(t, denoised.expand(x_t.shape[:2]))  # (B, T)
        B, T, C = x_t.shape
        source = torch.zeros_like(level) if self.dense else level
        x = torch.empty_like(x_t)
        for l, (h, w) in enumerate(self.grids):
            m = source == l
            x[:, m] = self.truth[l][:, frame[m], row[m] * w + col[m]]
        context = t[0] == 0
        assert torch.allclose(x_t[:, context], x[:, context], atol=5e-3), "context is not the ground truth"
        assert (action >= 0).all() and (action < 3).all()
        alpha, sigma = (a[..., None] for a in alpha_sigma(t))
        return (alpha * x_t - x) / sigma


def grids_for(levels):
    return [[2 ** (levels - 1 - l)] * 2 for l in range(levels)]  # coarsest level is 1 x 1


CASES = {  # name: (RolloutConfig fields, levels)
    "millivid-2": (dict(strategy="millivid", frames_per_level=(1, 4), extra_budget=4), 2),
    "millivid-3": (dict(strategy="millivid", frames_per_level=(1, 4, 16), extra_budget=16), 3),
    "millivid-4": (dict(strategy="millivid", frames_per_level=(1, 4, 16, 64), extra_budget=64), 4),
    "millivid-3x2": (dict(strategy="millivid", frames_per_level=(2, 8, 32), extra_budget=32), 3),
    "fullres": (dict(strategy="fullres", fullres_frames=5), 3),
    "framepack-hier": (dict(strategy="framepack_hier", framepack_denoised=2, framepack_context=(1, 4, 16)), 3),
    "framepack-dense": (dict(strategy="framepack", framepack_denoised=2, framepack_context=(1, 4, 16)), 3),
    "framepack-mirrored": (dict(strategy="framepack_mirrored", framepack_context=(1, 4, 16),
                                framepack_mirrored=(2, 4, 8)), 3),
    "upscale": (dict(strategy="upscale", upscale_frames=2, frames_per_level=(1, 4, 16)), 3),  # levels: len(W)
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_oracle_generation_reproduces_the_ground_truth(name):
    fields, levels = CASES[name]
    cfg = rollout.rollout_config("paper", **fields)
    grids = grids_for(levels)
    steps, clipped = rollout.strategy_steps(cfg, grids[0][0] * grids[0][1])
    dense = cfg.dense
    D0 = rollout.first_denoised(steps)
    per_chunk = steps[0].selection.shape[1] - D0 - clipped
    start = D0 + 3
    end = start + 2 * per_chunk + max(1, per_chunk // 2)  # three chunks, the last one overshooting `end`
    chunk_starts = rollout.chunk_starts(steps, start, end, clipped)
    frames = chunk_starts[-1] + steps[0].selection.shape[1]
    assert len(chunk_starts) == 3 and frames > end
    torch.manual_seed(0)
    B, C = 2, 3
    truth = [torch.randn(B, frames, h * w, C) for h, w in grids]  # defined past `end` for the oracle
    actions = torch.randint(0, 3, (B, end))                         # the video's actions stop at `end`
    given = [z[:, :end].clone() for z in truth]
    given_future = [z[:, start:].clone() for z in given]
    model = Oracle(truth, grids, dense)
    out = rollout.generate(model, steps, given, actions, start, end, grids, dense=dense, num_clipped=clipped,
                           sampling_steps=2)
    assert model.calls == 2 * len(steps) * len(chunk_starts)
    kept = 1 if dense or cfg.strategy == "fullres" else levels
    assert len(out) == kept and out[0].shape == (B, frames, *truth[0].shape[2:])
    for l in range(kept):  # under the oracle every write is exact, so every level of [start, end) is
        torch.testing.assert_close(out[l][:, start:end], truth[l][:, start:end], atol=1e-4, rtol=0)
        torch.testing.assert_close(out[l][:, :start], truth[l][:, :start])  # context untouched
    for z, z0 in zip(given, given_future):  # the caller's tensors are not written to
        assert torch.equal(z[:, start:], z0)


def test_generation_never_reads_the_ground_truth_future():
    """Corrupting the ground truth from `start` on must not change the rollout at all."""
    cfg = rollout.rollout_config("paper", **CASES["millivid-3"][0])
    grids = grids_for(3)
    steps, _ = rollout.strategy_steps(cfg, 16)
    torch.manual_seed(1)
    truth = [torch.randn(1, 96, h * w, 2) for h, w in grids]
    actions = torch.randint(0, 3, (1, 96))

    def model(x_t, t, denoised, frame, level, row, col, action, packing=None):  # a deterministic non-oracle net
        return torch.tanh(x_t * 1.7 + frame[..., None] * 0.01 + level[..., None] + action[..., None] * 0.1)

    runs = []
    for corrupt in (False, True):
        given = [z.clone() for z in truth]
        if corrupt:
            for z in given:
                z[:, 32:] = 100.0
        g = torch.Generator().manual_seed(5)
        runs.append(rollout.generate(model, steps, given, actions, 32, 96, grids, sampling_steps=3, generator=g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
