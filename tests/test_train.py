"""train.py: strict config overrides, the Muon/AdamW split, warmup, the resumable data stream,
and the gather that turns a chunk of latents into a rollout step's token sequence."""
import copy
import dataclasses
import json
import re

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
    """One mechanism for every config (data.make_config): command-line text parsed by the field's type,
    routed to the config that owns the key (train.build); unknown keys and bad values are named."""
    makers = {Cfg: lambda preset, **o: data.make_config(Cfg, {"tiny": {}}, preset, o),
              train.RunConfig: train.run_config}
    cfg, run = train.build("tiny", {"lr": "3e-4", "steps": "7", "levels": "1,4,16", "flag": "true",
                                    "variant": "cascaded", "seed": "5"}, makers)
    assert (cfg.lr, cfg.steps, cfg.levels, cfg.flag, cfg.variant) == (3e-4, 7, (1, 4, 16), True, "cascaded")
    assert run.seed == 5 and run.workers == 0  # the tiny preset's, kept
    with pytest.raises(SystemExit, match="unknown setting"):
        train.build("tiny", {"lrr": "1"}, makers)
    with pytest.raises(ValueError, match="Cfg: steps='seven' should be of type int"):
        data.make_config(Cfg, {"p": {}}, "p", {"steps": "seven"})
    with pytest.raises(ValueError, match="true/false"):
        data.make_config(Cfg, {"p": {}}, "p", {"flag": "yes please"})
    with pytest.raises(ValueError, match="unknown preset"):
        data.make_config(Cfg, {"p": {}}, "q", {})
    assert data.make_config(Cfg, {"p": {"steps": 3}}, "p", {"lr": 1}).lr == 1  # an int passes for a float
    with pytest.raises(SystemExit, match="error: DiTConfig.width = 49"):  # a config's own check, no traceback
        train.build("tiny", {"width": "49"}, {diffusion.DiTConfig: diffusion.dit_config})


def test_parse_command_forms():
    assert train.parse_command(["--stage", "ae", "--preset=tiny", "--lr=1e-4", "--batch-size", "8"]) == \
        ("ae", "tiny", {"lr": "1e-4", "batch_size": "8"})
    with pytest.raises(SystemExit):
        train.parse_command(["--stage", "bogus"])
    with pytest.raises(SystemExit):
        train.parse_command(["--stage", "ae", "stray"])


def test_muon_gets_exactly_the_linear_weights():
    model = nn.Sequential(nn.Embedding(5, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    muon, adamw = train.make_optimizers(model, 1e-3, 0.01)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_ids == {id(model[1].weight), id(model[3].weight)}  # 2-D Linear weights only
    assert adamw_ids == {id(p) for p in model.parameters()} - muon_ids  # embedding, biases, norm
    assert isinstance(muon, train.Muon)


def test_grouped_muon_takes_torch_muons_steps(monkeypatch):
    """train.Muon orthogonalises the matrices of one shape as one batch; its steps are torch.optim.Muon's (run
    with torch's Newton-Schulz iteration in float32, as ours runs it on a CPU), momentum and decay included."""
    def torch_newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):  # torch's _zeropower_via_newtonschulz
        a, b, c = ns_coefficients
        x = grad.float().T if grad.size(0) > grad.size(1) else grad.float()
        x = x / x.norm().clamp(min=eps)
        for _ in range(ns_steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if grad.size(0) > grad.size(1) else x
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", torch_newton_schulz_fp32)
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 9), nn.Linear(9, 3))  # shapes shared
    theirs = copy.deepcopy(ours)
    muon = train.make_optimizers(ours, 1e-2, 0.1)[0]
    reference = torch.optim.Muon([m.weight for m in theirs], lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, muon), (theirs, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)


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


def test_step_tokens_read_the_right_latents():
    """Each gathered token must equal latents[level][frame, row, col] of the chunk (hierarchical), or
    the level-0 latent at (frame, row, col) for the dense FramePack layout."""
    grids, chunk = [[4, 4], [2, 2], [1, 1]], 37
    step = rollout.millivid_steps([1, 4, 16], 16, 16)[3]
    # latents whose value encodes (level, frame, row, col), one channel each
    lat = [torch.tensor([[[[l, f, r, c] for r in range(h) for c in range(w)] for f in range(chunk)]],
                        dtype=torch.float32).reshape(1, chunk, h * w, 4) for l, (h, w) in enumerate(grids)]
    gather = rollout.step_tokens(step, grids, chunk, dense=False)
    flat = torch.cat([z.flatten(1, 2) for z in lat], 1)
    x = flat[0, gather["index"]]
    expected = torch.stack([gather["level"], gather["frame"], gather["row"], gather["col"]], -1).float()
    assert torch.equal(x, expected)

    fp = rollout.framepack_steps(1, [1, 4, 16])[0]
    gather = rollout.step_tokens(fp, grids, fp.selection.shape[1], dense=True)
    x = lat[0].flatten(1, 2)[0, gather["index"]]
    assert torch.equal(x[:, 0], torch.zeros(len(x)))  # every token comes from level 0
    assert torch.equal(x[:, 1:], torch.stack([gather["frame"], gather["row"], gather["col"]], -1).float())


def test_sampler_draws_rollout_steps_as_a_pure_function_of_the_step():
    steps = rollout.millivid_steps([1, 4, 16], 16, 16)
    probs = torch.tensor(rollout.step_probabilities(steps), dtype=torch.float64)
    make = lambda start, rank=0: train.StepBatches(40, 4, rank, 2, seed=3, start_step=start, num_steps=30, probs=probs)
    straight, resumed = list(make(0)), list(make(12))
    assert resumed == straight[12:] and all(len(b) == 4 and all(isinstance(p, tuple) for p in b) for b in straight)
    assert [i for i, _ in straight[5]] == make(0).batch(5) and list(make(0, rank=1))[5] != straight[5]
    drawn = [s for b in straight for _, s in b]  # 120 draws over 21 steps, group-balanced (§3.2)
    assert len(set(drawn)) > 10 and max(drawn) < len(steps)


# ----------------------------------------------------------------------------- the datasets the loops read

def test_frame_dataset_and_distributed_sampler_partition(tmp_path):
    rng = np.random.default_rng(0)
    videos = {"000/000": rng.integers(0, 256, (5, 8, 8, 3), np.uint8),
              "000/001": rng.integers(0, 256, (7, 8, 8, 3), np.uint8)}
    for k, v in videos.items():
        data.write_frames(str(tmp_path / f"{k}.frames"), v, len(v))
    (tmp_path / "index.json").write_text(json.dumps({k: len(v) for k, v in videos.items()}))
    ds = train.FrameDataset(str(tmp_path))
    assert len(ds) == 12
    x = ds[6]                                          # video 1, frame 1
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(videos["000/001"][1]).permute(2, 0, 1).float() / 255)
    parts = [list(torch.utils.data.distributed.DistributedSampler(ds, num_replicas=3, rank=r, shuffle=True, seed=5))
             for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(12)) and all(len(p) == 4 for p in parts)
    kept, val = train.split_keys([f"{i:03d}/000" for i in range(50)][::-1], holdout=0.1, seed=3)
    assert (kept, val) == train.split_keys([f"{i:03d}/000" for i in range(50)], holdout=0.1, seed=3)
    assert len(val) == 5 and sorted(kept + val) == [f"{i:03d}/000" for i in range(50)]


def test_latent_store_and_chunk_dataset_read_only_the_drawn_steps_cells(tmp_path, monkeypatch):
    """An item (chunk, rollout step) holds that step's tokens in the stored float16, as training_batch lays them
    out for the model, read from only the frames the step uses (memory-mapped rows), whatever the strategy."""
    rng, grids, C = np.random.default_rng(0), [(4, 4), (2, 2), (1, 1)], 3
    levels = {k: [rng.normal(size=(f, h * w, C)) for h, w in grids] for k, f in (("a/0", 40), ("a/1", 38))}
    for k, v in levels.items():
        tokenizer.write_latents(str(tmp_path), k, v, np.tile(np.arange(len(v[0]))[:, None] % 3, (1, 6)))
    (tmp_path / "index.json").write_text(json.dumps({k: len(v[0]) for k, v in levels.items()}))  # encode writes it
    np.testing.assert_array_equal(tokenizer.read_latents(str(tmp_path), "a/0", 1, 2, 5),
                                  levels["a/0"][1][2:5].astype(np.float16))
    for name in ("millivid", "framepack", "fullres"):
        roll = rollout.rollout_config("tiny", strategy=name)
        steps, _ = rollout.strategy_steps(roll, 16)
        N = steps[0].selection.shape[1]
        ds = rollout.ChunkDataset(str(tmp_path), ["a/0", "a/1"], N, steps, grids, roll.dense)
        assert len(ds) == (40 - N + 1) + (38 - N + 1) and ds.item_name(len(ds) - 1) == f"a/1 frames {38 - N}-37"
        gathers = [rollout.step_tokens(s, grids, N, roll.dense) for s in steps]
        read = []  # the rows each np.load hands out
        load = np.load
        monkeypatch.setattr(np, "load", lambda *a, **k: Recorder(load(*a, **k), read))
        for s in range(len(steps)):
            read.clear()
            item = ds[len(ds) - 1, s]  # the last chunk of a/1: frames 38 - N .. 37
            read_levels = levels["a/1"][:1] if roll.dense else levels["a/1"]
            whole = np.concatenate([z[38 - N:].reshape(-1, C) for z in read_levels])
            assert item["x"].dtype == torch.float16 and item["step"] == s
            np.testing.assert_array_equal(item["x"].numpy(), whole[gathers[s]["index"].numpy()].astype(np.float16))
            assert item["action"].tolist() == ((38 - N + gathers[s]["frame"]) % 3).tolist()
            frames = {(0 if roll.dense else l, f) for l, f in zip(gathers[s]["level"].tolist(),
                                                                  gathers[s]["frame"].tolist())}
            assert sum(read) == len(frames) + N  # the (level, frame) rows the step uses, and the chunk's actions
        monkeypatch.undo()
    batch = torch.utils.data.default_collate([ds[0, 0], ds[3, len(steps) - 1]])
    inputs = rollout.training_batch(batch, gathers, torch.device("cpu"))
    assert inputs["x"].dtype == torch.float32 and inputs["x"].shape == (2, len(gathers[0]["index"]), C)
    assert torch.equal(inputs["denoised"][1], gathers[-1]["denoised"])


class Recorder:  # a memory-mapped array that notes how many rows each read takes
    def __init__(self, array, log):
        self.array, self.log = array, log

    def __getitem__(self, index):
        out = self.array[index]
        self.log.append(len(out))
        return out


# ----------------------------------------------------------------------------- whole runs on the tiny preset

import os
import subprocess
import sys

import data
import diffusion
import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet_run(out, store, **fields):  # a RunConfig that logs and checkpoints only at the end (unless told)
    return train.RunConfig(**{**dict(out=str(out), data=store, workers=0, log_every=10**6, image_every=10**6,
                                     ckpt_every=10**6, holdout=0.25), **fields})


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
    first = tokenizer.HierarchicalAutoencoder.from_checkpoint(str(tmp_path / "resumed" / "ckpt-00000003.pt"))
    assert not same_parameters(first, resumed)  # the resumed run did train on


def test_encode_then_video_resume_is_exact(frames, tmp_path):
    """The encode stage writes every level of every frame; the video stage resumes exactly too."""
    train.train("ae", tokenizer.ae_config("tiny", steps=2, batch_size=4), quiet_run(tmp_path / "ae", frames), "tiny")
    train.encode_store(str(tmp_path / "ae"), frames, str(tmp_path / "latents"))
    meta = json.load(open(tmp_path / "latents" / "meta.json"))
    assert meta["grids"] == [[4, 4], [2, 2], [1, 1]] and meta["channels"] == 8
    key = sorted(data.load_index(frames))[0]
    ae = tokenizer.HierarchicalAutoencoder.from_checkpoint(str(tmp_path / "ae"))
    x = torch.from_numpy(data.read_frames(frames, key, 5, 7)).permute(0, 3, 1, 2).float() / 255
    for level, z in enumerate(ae.encode(x)):  # stored latents (float16) are the encoder's output
        np.testing.assert_allclose(tokenizer.read_latents(str(tmp_path / "latents"), key, level, 5, 7), z.detach(),
                                   atol=2e-3)
    for strategy in ("millivid", "framepack"):
        roll = rollout.rollout_config("tiny", strategy=strategy)
        cfg = lambda steps: diffusion.dit_config("tiny", dense=roll.dense, steps=steps, batch_size=4, warmup=3)
        store = str(tmp_path / "latents")
        straight = train.train("video", cfg(4), quiet_run(tmp_path / f"{strategy}-a", store), "tiny", roll)
        train.train("video", cfg(2), quiet_run(tmp_path / f"{strategy}-b", store), "tiny", roll)
        resumed = train.train("video", cfg(4), quiet_run(tmp_path / f"{strategy}-b", store), "tiny", roll)
        assert same_parameters(straight, resumed)
        # the checkpoint alone rebuilds the model and the strategy it was trained for
        loaded = diffusion.VideoDiT.from_checkpoint(str(tmp_path / f"{strategy}-b"))
        assert same_parameters(loaded, resumed) and loaded.cfg.dense == roll.dense
        assert rollout.RolloutConfig.from_checkpoint(str(tmp_path / f"{strategy}-b")) == roll
    with pytest.raises(ValueError, match="dense"):  # a dense model trained for a hierarchical strategy
        train.train("video", diffusion.dit_config("tiny", dense=True), quiet_run(tmp_path / "x", store), "tiny",
                    rollout.rollout_config("tiny"))


def test_gradient_accumulation_makes_the_same_steps(frames, tmp_path):
    """N micro-batches of B/N make the step of one batch of B (up to float summation order): the autoencoder and
    the video model (MilliVid with steps of different DENOISED counts in one batch, each micro-batch's loss
    weighted by its share; dense FramePack), with and without activation checkpointing."""
    def close(a, b):
        return all(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.state_dict().values(),
                                                                          b.state_dict().values()))
    ae = tokenizer.ae_config("tiny", steps=3, batch_size=4, warmup=1)
    one, two = (train.train("ae", ae, quiet_run(tmp_path / f"ae{n}", frames, grad_accum=n), "tiny") for n in (1, 2))
    assert close(one, two) and not same_parameters(one, two)  # the same step, summed in another order
    train.encode_store(str(tmp_path / "ae1"), frames, str(tmp_path / "latents"))
    for strategy in ("millivid", "framepack"):  # W = (2, 4, 16): steps denoise 32 or 16 tokens
        roll = rollout.rollout_config("tiny", strategy=strategy, frames_per_level=(2, 4, 16))
        cfg = diffusion.dit_config("tiny", dense=roll.dense, steps=3, batch_size=4, warmup=1)
        runs = [train.train("video", cfg, quiet_run(tmp_path / f"{strategy}{n}{c}", str(tmp_path / "latents"),
                                                    grad_accum=n, checkpointing=c), "tiny", roll)
                for n, c in ((1, False), (4, False), (2, True))]
        assert close(runs[0], runs[1]) and close(runs[0], runs[2])
    with pytest.raises(SystemExit, match="grad_accum=3 must divide the batch size 4"):
        train.train("ae", ae, quiet_run(tmp_path / "x", frames, grad_accum=3), "tiny")


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
    torch.manual_seed(0)  # train.py's initial weights (RunConfig.seed = 0)
    fresh = tokenizer.HierarchicalAutoencoder(tokenizer.ae_config("tiny")).state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0 if "weight" in k)


# ----------------------------------------------------------------------------- a user's first commands

def test_every_setting_of_every_stage_is_checked_before_any_work(tmp_path, capsys):
    root = str(tmp_path / "run")
    for argv, flag in ((["--stpes=5"], "--stpes: with --stage all, give each setting its stage"),
                       (["--eval.num_video=2"], "--eval.num_video: unknown setting"),
                       (["--ae.steps=0"], r"error in --ae.\*: AEConfig.steps = 0: expected >= 1"),
                       (["--video.lr=nan"], r"error in --video.\*: DiTConfig.lr = nan"),
                       (["--eval.sampling_steps=0"], "error in --eval.*: EvalConfig: expected"),
                       (["--video.heads=5"], "DiTConfig.width = 48: expected >= 12 .* and divisible by heads=5")):
        with pytest.raises(SystemExit, match=flag):
            train.main(["--stage", "all", "--preset", "tiny", f"--root={root}", *argv])
        assert not os.path.exists(root), argv  # refused before any work: not even a folder
    with pytest.raises(SystemExit) as done:
        train.main(["--help", "--preset", "tiny"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and "--stage ae" in text and "--stage all" in text
    assert "  --steps=800  optimizer steps" in text and "  --frames_per_level=1,4,16  MilliVid W_l" in text


def test_training_log_lines_show_position_rate_and_eta(tmp_path, capsys):
    frames = str(tmp_path / "frames")
    data.make_maze(frames, data.maze_config("tiny", videos=2, workers=1), "train")
    cfg = tokenizer.ae_config("tiny", steps=4, batch_size=4)
    train.train("ae", cfg, dataclasses.replace(quiet_run(tmp_path / "ae", frames), log_every=2), "tiny")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "steps 2/4 (50%)" in lines[0] and "steps 4/4 (100%)" in lines[1]
    assert all(re.search(r"/s, eta \d\d:\d\d:\d\d$", line) for line in lines)


def test_two_nodes_by_c10d_rendezvous_keep_ranks_identical(frames, tmp_path):
    """The README's multi-node launch, as 2 nodes x 1 process on localhost (gloo): two torchrun agents meet
    at one c10d endpoint, get node ranks 0 and 1, train the ae stage from its command line for 3 steps, and
    end with the same parameters on both ranks (which moved)."""
    import signal
    import socket
    import time
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "node.py"  # train.main's path to the model (run_stage), then each rank saves its own
    script.write_text(f"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {ROOT!r})
import train
stage, preset, overrides = train.parse_command(["--stage", "ae", "--preset", "tiny", "--steps=3", "--batch_size=2",
    "--warmup=1", "--holdout=0.25", "--data={frames}", "--out={tmp_path / 'run'}"])
model = train.run_stage(stage, preset, overrides, {str(tmp_path)!r})
where = {{k: int(os.environ[k]) for k in ("RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE")}}
torch.save({{"model": model.state_dict(), "world": dist.get_world_size(), **where}},
           {str(tmp_path)!r} + f"/rank{{where['RANK']}}.pt")
dist.destroy_process_group()
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
              "--rdzv_backend=c10d", f"--rdzv_endpoint=localhost:{port}", f"--rdzv_id=test-{os.getpid()}",
              "--local_addr=127.0.0.1", str(script)]  # local_addr: the workers' master is localhost too
    logs = [open(tmp_path / f"node{n}.log", "w") for n in (0, 1)]
    nodes = [subprocess.Popen(launch, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
             for log in logs]
    try:  # wait for both, but stop at the first failure: the other node would wait on it for minutes
        deadline = time.time() + 300
        while time.time() < deadline and any(n.poll() is None for n in nodes) and not any(n.poll() for n in nodes):
            time.sleep(0.2)
    finally:  # whatever happened, no agent or worker of ours outlives the test: SIGTERM makes an agent stop its
        for node in nodes:  # workers (their own sessions) within a second; SIGKILL if it does not exit
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
                try:
                    node.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(node.pid, signal.SIGKILL)
                    node.wait()
        for log in logs:
            log.close()
    text = "".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert [n.returncode for n in nodes] == [0, 0], text[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    # two nodes of one process each, one world of two
    assert sorted(r["GROUP_RANK"] for r in ranks) == [0, 1] and [r["LOCAL_RANK"] for r in ranks] == [0, 0]
    assert [(r["RANK"], r["WORLD_SIZE"], r["world"]) for r in ranks] == [(0, 2, 2), (1, 2, 2)]
    assert json.load(open(tmp_path / "run" / "config.json"))["world_size"] == 2  # what the run recorded
    assert "world 2" in text and os.path.exists(tmp_path / "run" / "ckpt-00000003.pt")
    rank0, rank1 = ranks[0]["model"], ranks[1]["model"]
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    torch.manual_seed(0)  # the initial weights train.py starts from (RunConfig.seed)
    fresh = tokenizer.HierarchicalAutoencoder(tokenizer.ae_config("tiny", batch_size=2, steps=3, warmup=1)).state_dict()
    assert any(not torch.equal(rank0[k], fresh[k]) for k in rank0 if "weight" in k)
