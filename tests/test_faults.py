"""Faults on the tiny preset: nothing lost, nothing silently wrong. A non-finite batch stops training with
the good checkpoints intact; latents remember the autoencoder that made them; one writer per run folder;
a truncated checkpoint is skipped; SIGTERM and kill -9 resume exactly; a full disk and bad data files are
one clear line naming the file."""
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import diffusion
import evaluate
import rollout
import tokenizer
import train
from test_train import quiet_run, same_parameters as same  # (the `frames` store: conftest.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRIDS = [[4, 4], [2, 2], [1, 1]]  # the tiny autoencoder's latent grids


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # runs compared bit for bit across processes use the same thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ae_config(steps):
    return tokenizer.ae_config("tiny", steps=steps, batch_size=4, warmup=3)


def latent_store(root, videos=4, frames=60, scale=1.0, keys=None):
    """A latent store as the encode stage writes it, with random latents (times `scale`: inf poisons them)."""
    rng = np.random.default_rng(0)
    for key in keys or [f"000/{i:03d}" for i in range(videos)]:
        levels = [rng.normal(size=(frames, h * w, 8)) * scale for h, w in GRIDS]
        actions = np.tile(rng.integers(0, 3, (frames, 1)), (1, 6)).astype(np.float32)
        tokenizer.write_latents(root, key, levels, actions)
    if keys is None:  # a new store (not a rewrite of some videos): its meta.json and index.json
        data.write_json(os.path.join(root, "meta.json"), {"grids": GRIDS, "channels": 8, "ae_sha256": "test"})
        data.write_json(os.path.join(root, "index.json"), {f"000/{i:03d}": frames for i in range(videos)})
    return root


# ----------------------------------------------------------------------------- 1. the finite-loss guard

def test_a_non_finite_batch_stops_training_and_keeps_the_good_checkpoints(tmp_path):
    store = latent_store(str(tmp_path / "latents"), videos=8)
    roll, cfg = rollout.rollout_config("tiny"), diffusion.dit_config("tiny", steps=40, batch_size=4, warmup=3)
    run = quiet_run(tmp_path / "video", store, ckpt_every=1, keep=100)
    # the data stream is a pure function of the step: poison a video that step 0 does not read, and find
    # the first step that reads it
    steps = rollout.strategy_steps(roll, 16)[0]
    dataset = rollout.ChunkDataset(store, train.split_keys(sorted(data.load_index(store)), 0.25)[0], 37, steps,
                                   [(4, 4), (2, 2), (1, 1)])
    sampler = train.StepBatches(len(dataset), 4, 0, 1, 0, 0, 40)
    first = {dataset.item_name(i).split()[0] for i in sampler.batch(0)}
    key = next(k for k in dataset.keys if k not in first)
    bad = next(s for s in range(40) if any(key in dataset.item_name(i) for i in sampler.batch(s)))
    latent_store(store, frames=60, scale=np.inf, keys=[key])
    with pytest.raises(SystemExit, match=f"non-finite loss or gradient norm at step {bad + 1}, batch .*{key}"):
        train.train("video", cfg, run, "tiny", roll)
    kept = sorted(f for f in os.listdir(run.out) if f.startswith("ckpt-"))
    assert kept == [f"ckpt-{s:08d}.pt" for s in range(1, bad + 1)]  # every good step, no bad one
    for name in kept:
        assert all(torch.isfinite(v).all() for v in torch.load(os.path.join(run.out, name))["model"].values())


# ----------------------------------------------------------------------------- 2. provenance

def test_encode_re_encodes_what_another_autoencoder_made_and_evaluation_refuses_a_mismatch(frames, tmp_path):
    first = train.train("ae", ae_config(2), quiet_run(tmp_path / "ae1", frames), "tiny")
    torch.manual_seed(1)
    second = train.train("ae", ae_config(2), quiet_run(tmp_path / "ae2", frames, seed=1), "tiny")
    store = str(tmp_path / "latents")
    train.encode_store(str(tmp_path / "ae1"), frames, store)
    made_by = lambda: json.load(open(os.path.join(store, "meta.json")))["ae_sha256"]
    assert made_by() == tokenizer.sha256(tokenizer.newest_checkpoint(str(tmp_path / "ae1")))
    train.encode_store(str(tmp_path / "ae2"), frames, store)  # another autoencoder: everything is re-encoded
    assert made_by() == tokenizer.sha256(tokenizer.newest_checkpoint(str(tmp_path / "ae2")))
    x = torch.from_numpy(data.read_frames(frames, "000/001", 3, 4)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        z = second.eval().encode(x)[0]
        assert not torch.allclose(first.eval().encode(x)[0], z, atol=1e-2)
    np.testing.assert_allclose(tokenizer.read_latents(store, "000/001", 0, 3, 4), z, atol=2e-3)
    # evaluation decodes with the pipeline's autoencoder: latents made by another one are refused
    root = tmp_path / "pipeline"
    os.makedirs(root / "latents")
    os.symlink(tmp_path / "ae1", root / "ae")
    os.symlink(store, root / "latents" / "test")
    with pytest.raises(SystemExit, match="encoded by another autoencoder"):
        evaluate.evaluate(evaluate.eval_config("tiny", root=str(root)))


def test_video_stage_refuses_an_incomplete_store_and_a_resume_with_other_settings(tmp_path):
    store = latent_store(str(tmp_path / "latents"))
    roll = rollout.rollout_config("tiny")
    cfg = lambda **f: diffusion.dit_config("tiny", **{**dict(steps=2, batch_size=4, warmup=3), **f})
    train.train("video", cfg(), quiet_run(tmp_path / "video", store), "tiny", roll)
    with pytest.raises(SystemExit, match=r"made with other settings \(lr\)"):
        train.train("video", cfg(steps=4, lr=5e-4), quiet_run(tmp_path / "video", store), "tiny", roll)
    assert json.load(open(tmp_path / "video" / "config.json"))["model"]["lr"] == 1e-3  # still the run's own
    os.remove(os.path.join(store, "index.json"))
    with pytest.raises(SystemExit, match="no complete latent store.*--stage encode"):
        train.train("video", cfg(), quiet_run(tmp_path / "other", store), "tiny", roll)


def test_data_made_with_other_settings_is_not_reused(tmp_path):
    root = str(tmp_path / "run")
    data.make_maze(f"{root}/data/train", data.maze_config("tiny", videos=2, frames=40, context=16, workers=1))
    with pytest.raises(SystemExit, match=r"other data settings: .*videos=2 \(now 32\)"):
        train.run_all("tiny", {}, root)


# ----------------------------------------------------------------------------- 3. one writer per run folder

def test_a_second_writer_is_refused_and_stale_temporaries_are_removed(frames, tmp_path):
    out = tmp_path / "ae"
    os.makedirs(out)
    (out / "ckpt-00000001.tmp4242.pt").write_bytes(b"half a checkpoint")
    with train.run_lock(str(out)):
        assert not (out / "ckpt-00000001.tmp4242.pt").exists()
        with pytest.raises(SystemExit, match=f"{out} is in use by another run \\(pid {os.getpid()}"):
            train.train("ae", ae_config(1), quiet_run(out, frames), "tiny")
    train.train("ae", ae_config(1), quiet_run(out, frames), "tiny")  # released: the next run may write
    assert os.path.exists(out / "ckpt-00000001.pt")


# ----------------------------------------------------------------------------- 4. an unreadable checkpoint

def test_resume_skips_a_truncated_newest_checkpoint(frames, tmp_path, capsys):
    straight = train.train("ae", ae_config(3), quiet_run(tmp_path / "a", frames), "tiny")
    train.train("ae", ae_config(3), quiet_run(tmp_path / "b", frames, ckpt_every=1, keep=5), "tiny")
    newest = tmp_path / "b" / "ckpt-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a full disk or a killed copy
    with pytest.raises(ValueError, match="ckpt-00000003.pt: cannot load"):
        tokenizer.read_checkpoint(str(newest), "ae")  # a file asked for by name: an error naming it
    resumed = train.train("ae", ae_config(3), quiet_run(tmp_path / "b", frames), "tiny")
    assert "skipping" in capsys.readouterr().out and same(straight, resumed)
    assert tokenizer.HierarchicalAutoencoder.from_checkpoint(str(tmp_path / "b")).source.endswith("ckpt-00000003.pt")


# ----------------------------------------------------------------------------- 5. signals and kill -9

def test_sigterm_checkpoints_the_step_and_resume_is_exact(frames, tmp_path, monkeypatch):
    straight = train.train("ae", ae_config(6), quiet_run(tmp_path / "a", frames), "tiny")
    lr_at, sent = train.lr_at, []

    def signal_at_step_3(step, lr, warmup):  # a scheduler's SIGTERM arrives once, during step 3
        if step == 3 and not sent:
            sent.append(signal.raise_signal(signal.SIGTERM))
        return lr_at(step, lr, warmup)
    monkeypatch.setattr(train, "lr_at", signal_at_step_3)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="stopped by SIGTERM after step 4: checkpoint .*ckpt-00000004.pt"):
        train.train("ae", ae_config(6), quiet_run(tmp_path / "b", frames), "tiny")
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are restored
    monkeypatch.setattr(train, "lr_at", lr_at)
    assert same(straight, train.train("ae", ae_config(6), quiet_run(tmp_path / "b", frames), "tiny"))


def run_script(out, frames, steps):
    return [sys.executable, "-c", f"""
import sys; sys.path.insert(0, {ROOT!r})
import torch, tokenizer, train
torch.set_num_threads(1)
cfg = tokenizer.ae_config("tiny", steps={steps}, batch_size=4, warmup=3)
train.train("ae", cfg, train.RunConfig(out={str(out)!r}, data={frames!r}, workers=0, log_every=1, image_every=10**6,
                                       ckpt_every=1, holdout=0.25), "tiny")
"""]


@pytest.mark.parametrize("kill_at", [1, 7])
def test_kill_9_at_any_moment_resumes_exactly(frames, tmp_path, kill_at):
    """SIGKILL right after step `kill_at` is logged, as its checkpoint is being written (a checkpoint every
    step), then a rerun resumes and ends where an uninterrupted run ends, bit for bit."""
    straight = train.train("ae", ae_config(30), quiet_run(tmp_path / "a", frames), "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(run_script(tmp_path / "b", frames, 30), stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith(f"step {kill_at:7d} "):
            proc.kill()
            break
    proc.wait()
    assert (tokenizer.newest_checkpoint(str(tmp_path / "b")) or "") < str(tmp_path / "b" / "ckpt-00000030.pt")
    done = subprocess.run(run_script(tmp_path / "b", frames, 30), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert same(straight, tokenizer.HierarchicalAutoencoder.from_checkpoint(str(tmp_path / "b")))


# ----------------------------------------------------------------------------- 6. a full disk

def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "out" / "x.json"
    data.write_json(str(path), {"a": 1})

    def full(tmp):
        open(tmp, "w").write("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=f"cannot write {path}: No space left on device"):
        data.atomic_write(str(path), full)
    assert os.listdir(tmp_path / "out") == ["x.json"] and json.load(open(path)) == {"a": 1}  # the old file intact

def test_a_full_disk_ends_training_with_one_line(frames, tmp_path, monkeypatch):
    def no_space(path, write):
        raise OSError(f"cannot write {path}: No space left on device (is the disk full or the folder read-only?)")
    monkeypatch.setattr(data, "atomic_write", no_space)
    with pytest.raises(SystemExit, match=r"^error: cannot write .*config.json: No space left on device"):
        train.main(["--stage", "ae", "--preset", "tiny", f"--root={tmp_path}", f"--data={frames}", "--steps=1"])


# ----------------------------------------------------------------------------- 7. data readers name the file

def test_bad_data_files_are_named(tmp_path):
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    data.write_frames(str(tmp_path / "v.frames"), frames, 3)
    blob = bytearray((tmp_path / "v.frames").read_bytes())
    blob[-40:] = b"x" * 40  # corrupt the last PNG
    (tmp_path / "v.frames").write_bytes(bytes(blob))
    assert data.read_frames(str(tmp_path), "v", 0, 1).shape == (1, 8, 8, 3)  # the others still read
    with pytest.raises(ValueError, match=r"v.frames: frames \[2, 3\) are not readable PNGs"):
        data.read_frames(str(tmp_path), "v", 2, 3)
    for bad in (np.full((3, 6), np.nan), np.zeros((3, 5)), np.full((3, 6), 7.0)):  # NaN, wrong shape, bad action
        np.save(tmp_path / "v.npy", bad)
        with pytest.raises(ValueError, match="v.npy: expected finite"):
            data.read_actions(str(tmp_path), "v")
    store = latent_store(str(tmp_path / "latents"), videos=1, frames=10)
    data.write_json(os.path.join(store, "index.json"), {"000/000": 12})  # the index promises more than the store
    with pytest.raises(ValueError, match=r"000/000/l0.npy: frames \[0, 12\) requested"):
        tokenizer.read_latents(store, "000/000", 0, 0, 12)
