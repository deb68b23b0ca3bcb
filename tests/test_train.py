"""train.py: strict config overrides, the Muon/AdamW split, warmup, the resumable data stream,
and the gather that turns a chunk of latents into a rollout step's token sequence."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn

import rollout
import train


@dataclasses.dataclass
class Cfg:
    lr: float = 1e-3
    steps: int = 10
    levels: tuple = (3, 12)
    variant: str = "hierarchical"
    flag: bool = False


def test_overrides_are_typed_and_strict():
    cfg, run = Cfg(), train.RunConfig()
    train.apply_overrides([cfg, run], {"lr": "3e-4", "steps": "7", "levels": "1,4,16", "flag": "true",
                                       "variant": "cascaded", "seed": "5"})
    assert (cfg.lr, cfg.steps, cfg.levels, cfg.flag, cfg.variant) == (3e-4, 7, (1, 4, 16), True, "cascaded")
    assert run.seed == 5
    with pytest.raises(SystemExit, match="unknown setting"):
        train.apply_overrides([cfg, run], {"lrr": "1"})
    with pytest.raises(SystemExit, match="--steps=seven"):
        train.apply_overrides([cfg, run], {"steps": "seven"})
    with pytest.raises(SystemExit, match="true/false"):
        train.apply_overrides([cfg, run], {"flag": "yes please"})


def test_parse_args_forms():
    assert train.parse_args(["--stage", "ae", "--preset=tiny", "--lr=1e-4", "--batch-size", "8"]) == \
        ("ae", "tiny", {"lr": "1e-4", "batch_size": "8"})
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "bogus"])
    with pytest.raises(SystemExit):
        train.parse_args(["--stage", "ae", "stray"])


def test_muon_gets_exactly_the_linear_weights():
    model = nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    muon, adamw = train.make_optimizers(model, 1e-3, 0.01)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(model[1].weight), id(model[3].weight)}  # 2-D Linear weights only
    assert adamw_ids == {id(p) for p in model.parameters()} - muon_ids  # embedding, biases, norm
    assert isinstance(muon, torch.optim.Muon)


def test_warmup_is_linear_from_zero_then_constant():
    assert train.lr_at(0, 1e-3, 2000) == pytest.approx(1e-3 / 2000)
    assert train.lr_at(999, 1e-3, 2000) == pytest.approx(0.5e-3)
    assert train.lr_at(1999, 1e-3, 2000) == pytest.approx(1e-3)
    assert train.lr_at(10**6, 1e-3, 2000) == pytest.approx(1e-3)


def test_data_stream_resumes_exactly_and_ranks_partition_each_batch():
    straight = list(train.StepBatches(50, 4, 0, 1, seed=3, start_step=0, num_steps=40))
    resumed = list(train.StepBatches(50, 4, 0, 1, seed=3, start_step=17, num_steps=40))
    assert resumed == straight[17:]
    assert len({tuple(b) for b in straight[:12]}) == 12  # 12 batches per epoch, all different
    epoch = sorted(i for b in straight[:12] for i in b)
    assert len(set(epoch)) == 48  # no index twice within an epoch
    ranks = [list(train.StepBatches(50, 4, r, 2, seed=3, start_step=0, num_steps=6)) for r in (0, 1)]
    for b0, b1 in zip(*ranks):
        assert not set(b0) & set(b1)
    with pytest.raises(SystemExit, match="batch_size"):
        train.StepBatches(3, 4, 0, 1, seed=0, start_step=0, num_steps=1)


def test_step_gather_reads_the_right_latents():
    """Each gathered token must equal latents[level][frame, row, col] of the chunk (hierarchical), or
    the level-0 latent at (frame, row, col) for the dense FramePack layout."""
    grids, chunk = [[4, 4], [2, 2], [1, 1]], 37
    step = rollout.millivid_steps([1, 4, 16], 16, 16)[3]
    # latents whose value encodes (level, frame, row, col), one channel each
    lat = [torch.tensor([[[[l, f, r, c] for r in range(h) for c in range(w)] for f in range(chunk)]],
                        dtype=torch.float32).reshape(1, chunk, h * w, 4) for l, (h, w) in enumerate(grids)]
    gather = train.step_gather(step, grids, chunk, dense=False)
    flat = torch.cat([z.flatten(1, 2) for z in lat], 1)
    x = flat[0, gather["index"]]
    expected = torch.stack([gather["level"], gather["frame"], gather["row"], gather["col"]], -1).float()
    assert torch.equal(x, expected)

    fp = rollout.framepack_steps(1, [1, 4, 16])[0]
    gather = train.step_gather(fp, grids, fp.selection.shape[1], dense=True)
    x = lat[0].flatten(1, 2)[0, gather["index"]]
    assert torch.equal(x[:, 0], torch.zeros(len(x)))  # every token comes from level 0
    assert torch.equal(x[:, 1:], torch.stack([gather["frame"], gather["row"], gather["col"]], -1).float())


def test_video_inputs_draw_steps_and_actions():
    grids, chunk = [[4, 4], [2, 2], [1, 1]], 37
    steps = rollout.millivid_steps([1, 4, 16], 16, 16)
    gathers = [train.step_gather(s, grids, chunk, dense=False) for s in steps]
    probs = torch.tensor(rollout.step_probabilities(steps), dtype=torch.float64)
    batch = {"latents": [torch.randn(3, chunk, h * w, 8) for h, w in grids],
             "actions": torch.arange(chunk).repeat(3, 1)}
    torch.manual_seed(0)
    inputs = train.video_inputs(batch, gathers, probs, torch.device("cpu"))
    assert inputs["x"].shape == (3, 64, 8)  # tiny budget: 64 tokens per step
    assert torch.equal(inputs["action"], inputs["frame"])  # action of each token's own frame
    assert set(inputs["role"].unique().tolist()) == {rollout.CONTEXT, rollout.DENOISED}
