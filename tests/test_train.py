"""train.py: strict config overrides, the Muon/AdamW split, warmup, the resumable data stream,
and the gather that turns a chunk of latents into a rollout step's token sequence."""
import dataclasses
import json

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


# ----------------------------------------------------------------------------- whole runs on the tiny preset

import os
import subprocess
import sys

import data
import diffusion
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("frames") / "train")
    data.make_maze(out, data.maze_config("tiny", videos=4, workers=1), "train")
    return out


def quiet_run(out, store, **fields):
    return train.RunConfig(out=str(out), data=store, workers=0, log_every=10**6, image_every=10**6,
                           ckpt_every=10**6, holdout=0.25, **fields)


def same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_autoencoder_resume_is_exact(frames, tmp_path):
    """N steps, stop, resume for N more == 2N steps straight, bit for bit (CPU)."""
    cfg = lambda steps: tokenizer.ae_config("tiny", steps=steps, batch_size=4, warmup=3)
    straight = train.train("ae", cfg(6), quiet_run(tmp_path / "straight", frames), "tiny")
    train.train("ae", cfg(3), quiet_run(tmp_path / "resumed", frames), "tiny")
    assert os.path.exists(tmp_path / "resumed" / "ckpt-00000003.pt")
    resumed = train.train("ae", cfg(6), quiet_run(tmp_path / "resumed", frames), "tiny")
    assert same_parameters(straight, resumed)
    first = train.load_model(str(tmp_path / "resumed" / "ckpt-00000003.pt"))
    assert not same_parameters(first, resumed)  # the resumed run did train on


def test_encode_then_video_resume_is_exact(frames, tmp_path):
    """The encode stage writes every level of every frame; the video stage resumes exactly too."""
    train.train("ae", tokenizer.ae_config("tiny", steps=2, batch_size=4), quiet_run(tmp_path / "ae", frames), "tiny")
    train.encode_store(str(tmp_path / "ae"), frames, str(tmp_path / "latents"))
    meta = json.load(open(tmp_path / "latents" / "meta.json"))
    assert meta["grids"] == [[4, 4], [2, 2], [1, 1]] and meta["channels"] == 8
    key = sorted(data.load_index(frames))[0]
    ae = train.load_model(str(tmp_path / "ae"))
    x = torch.from_numpy(data.read_frames(frames, key, 5, 7)).permute(0, 3, 1, 2).float() / 255
    for level, z in enumerate(ae.encode(x)):  # stored latents (float16) are the encoder's output
        np.testing.assert_allclose(data.read_latents(str(tmp_path / "latents"), key, level, 5, 7), z.detach(),
                                   atol=2e-3)
    for strategy in ("millivid", "framepack"):
        cfg = lambda steps: diffusion.dit_config("tiny", strategy=strategy, steps=steps, batch_size=4, warmup=3)
        store = str(tmp_path / "latents")
        straight = train.train("video", cfg(4), quiet_run(tmp_path / f"{strategy}-a", store), "tiny")
        train.train("video", cfg(2), quiet_run(tmp_path / f"{strategy}-b", store), "tiny")
        resumed = train.train("video", cfg(4), quiet_run(tmp_path / f"{strategy}-b", store), "tiny")
        assert same_parameters(straight, resumed)


def test_two_process_torchrun_keeps_ranks_identical(frames, tmp_path):
    """DDP on gloo (CPU): after a few steps both ranks hold the same parameters (and they moved)."""
    script = tmp_path / "ddp.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {ROOT!r})
import tokenizer, train
cfg = tokenizer.ae_config("tiny", steps=3, batch_size=2, warmup=1)
run = train.RunConfig(out={str(tmp_path / 'run')!r}, data={frames!r}, workers=0, holdout=0.25)
model = train.train("ae", cfg, run, "tiny")
torch.save(model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    fresh = tokenizer.HierarchicalAutoencoder(tokenizer.ae_config("tiny")).state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0 if "weight" in k)
