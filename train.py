"""Every training stage of MilliVid, as one straight script (paper App. A.2).

    python train.py --stage ae     --preset toy      # hierarchical autoencoder on single frames (§3.1)
    python train.py --stage encode --preset toy      # every frame of every video -> all levels
    python train.py --stage video  --preset toy --strategy millivid   # video DiT (§3.2)
    python train.py --stage all    --preset toy      # data -> ae -> encode -> 3 video models -> eval
    torchrun --nproc_per_node=8 train.py --stage ae --preset paper      # the real thing

Settings come from the stage's dataclass (`AEConfig` in tokenizer.py, `DiTConfig` in diffusion.py,
both defaulting to the paper) and this file's `RunConfig`; any field can be overridden with a strict
`--key=value` (unknown key or unparsable value is an error). The resolved configuration is printed,
written next to the outputs with the git commit, and stored in every checkpoint, so later stages
rebuild models from a checkpoint alone.

Training recipe (App. A.2, both stages): Muon for every 2-D `nn.Linear` weight and AdamW for the rest,
lr 1e-3, weight decay 0.01, linear warmup from 0 over 2k steps then constant, gradient clipping at 1.0,
bf16 autocast on CUDA (fp32 master weights), no EMA. DDP when launched by torchrun (NCCL on CUDA,
gloo on CPU), otherwise one process on cuda / mps / cpu.
"""
import dataclasses
import glob
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import diffusion
import rollout
import tokenizer


@dataclass
class RunConfig:
    out: str = ""          # this stage's output folder ("" = runs/<preset>/<stage name>)
    data: str = ""         # input store: frames for ae/encode, latents for video ("" = the preset's)
    seed: int = 0
    log_every: int = 50
    image_every: int = 1000
    ckpt_every: int = 1000
    keep: int = 2          # newest checkpoints kept on disk
    workers: int = 4       # DataLoader worker processes (0 = load in the main process)
    holdout: float = 0.01  # fraction of training videos held out for periodic images / val loss


# ----------------------------------------------------------------------------- configuration


def parse_value(text, like):
    """Parse `text` into the type of the default value `like` (strict: bad values raise)."""
    if isinstance(like, bool):
        if text.lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("1", "true")
    if isinstance(like, tuple):  # "3,12,48,192" -> (3, 12, 48, 192)
        kind = type(like[0]) if like else int
        return tuple(kind(v) for v in text.split(",") if v)
    return type(like)(text)


def apply_overrides(configs, overrides):
    """Apply {key: text} to whichever of `configs` (dataclass instances) owns `key`; strict."""
    for key, text in overrides.items():
        owners = [c for c in configs if key in {f.name for f in dataclasses.fields(c)}]
        if len(owners) != 1:
            known = sorted({f.name for c in configs for f in dataclasses.fields(c)})
            why = "unknown" if not owners else "ambiguous"
            raise SystemExit(f"--{key}: {why} setting; known settings: {', '.join(known)}")
        try:
            setattr(owners[0], key, parse_value(text, getattr(owners[0], key)))
        except ValueError as e:
            raise SystemExit(f"--{key}={text}: {e}") from None


def parse_args(argv):
    """`--stage ae --preset toy --lr=3e-4 ...` -> (stage, preset, {key: text})."""
    args, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise SystemExit(f"unexpected argument {token!r}; settings are given as --key=value")
        key, eq, value = token[2:].partition("=")
        if not eq:  # "--stage ae" form
            if i + 1 >= len(argv):
                raise SystemExit(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        args[key.replace("-", "_")] = value
        i += 1
    stage, preset = args.pop("stage", None), args.pop("preset", "toy")
    if stage not in ("ae", "encode", "video", "all"):
        raise SystemExit("--stage must be one of ae, encode, video, all")
    if preset not in ("paper", "toy", "tiny"):
        raise SystemExit("--preset must be one of paper, toy, tiny")
    return stage, preset, args


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "unknown"


def write_json(path, obj):
    """Atomic JSON write: a killed job never leaves a truncated file that looks valid."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- setup


def setup():
    """DDP when launched by torchrun, else one process on the best device. Returns (rank, world, device)."""
    if "RANK" in os.environ:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return rank, world, device
    if torch.cuda.is_available():
        return 0, 1, torch.device("cuda")
    if torch.backends.mps.is_available():
        return 0, 1, torch.device("mps")
    return 0, 1, torch.device("cpu")


def seed_step(seed, rank, step):
    """All randomness of training step `step` on rank `rank` is a pure function of (seed, rank, step):
    resuming from a checkpoint then needs no saved RNG state and reproduces the straight run exactly."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def make_optimizers(model, lr, weight_decay):
    """Muon for exactly the 2-D weights of nn.Linear layers, AdamW for everything else (App. A.2).
    `match_rms_adamw` scales Muon's orthogonalised update to AdamW's RMS so one lr serves both."""
    muon_params = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    muon_ids = {id(p) for p in muon_params}
    adamw_params = [p for p in model.parameters() if id(p) not in muon_ids]
    muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay)
    return [muon, adamw]


def lr_at(step, lr, warmup):
    """Linear warmup from 0 over `warmup` steps, then constant (App. A.2). Step 0 gets lr/warmup."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


def save_checkpoint(out, step, state, keep):
    """Write then rename, so a killed job never leaves a broken checkpoint; keep the newest `keep`."""
    path = os.path.join(out, f"ckpt-{step:08d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    for old in sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))[:-keep]:
        os.remove(old)
    return path


def latest_checkpoint(folder):
    paths = sorted(glob.glob(os.path.join(folder, "ckpt-*.pt")))
    return paths[-1] if paths else None


def load_model(path, device="cpu"):
    """Rebuild a trained model from a checkpoint file (or a run folder's newest) alone: the resolved
    config stored in it says which model and how big. Returned in eval mode on `device`."""
    file = latest_checkpoint(path) if os.path.isdir(path) else path
    if not file or not os.path.isfile(file):
        raise SystemExit(f"no checkpoint at {path}: train that stage first (python train.py --stage ...)")
    ckpt = torch.load(file, map_location="cpu", weights_only=False)
    stage, fields = ckpt["config"]["stage"], ckpt["config"]["model"]
    model = tokenizer.HierarchicalAutoencoder(tokenizer.AEConfig(**fields)) if stage == "ae" else \
        diffusion.VideoDiT(diffusion.DiTConfig(**fields))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


class StepBatches(torch.utils.data.Sampler):
    """Batches of dataset indices as a pure function of the step: epoch e is a seeded permutation,
    step s takes global batch s mod (batches per epoch), and each rank takes its slice of it.
    Starting at any step reproduces the straight run's data stream (exact resume)."""

    def __init__(self, n, batch_size, rank, world, seed, start_step, num_steps):
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise SystemExit(f"dataset has {n} items, fewer than one global batch "
                             f"({batch_size} x {world} ranks): lower --batch_size")
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop = start_step, num_steps

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        perm, epoch = None, -1
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
                perm = torch.randperm(self.n, generator=g)
            first = (step % self.per_epoch) * self.b * self.world + self.rank * self.b
            yield perm[first:first + self.b].tolist()


# ----------------------------------------------------------------------------- the training loop


def train(stage, cfg, run, preset):
    """One training run (stage "ae" or "video"): config -> setup -> data -> model -> optimizer -> loop.
    Returns the trained model (the newest checkpoint in run.out holds the same weights)."""
    rank, world, device = setup()
    master = rank == 0
    os.makedirs(run.out, exist_ok=True)
    resolved = {"stage": stage, "preset": preset, "model": dataclasses.asdict(cfg),
                "run": dataclasses.asdict(run), "git_commit": git_commit(), "world_size": world}
    if master:
        print(json.dumps(resolved, indent=2))
        write_json(os.path.join(run.out, "config.json"), resolved)

    torch.manual_seed(run.seed)  # the same initial weights on every rank and in every (re)start
    # data: single random frames for the autoencoder, (video, chunk start) pairs for the video model
    keys = sorted(data.load_index(run.data))
    train_keys, val_keys = data.split_keys(keys, holdout=run.holdout, seed=run.seed)
    if stage == "ae":
        dataset = data.FrameDataset(run.data, train_keys)
        model = tokenizer.HierarchicalAutoencoder(cfg)
        if cfg.lpips_weight > 0:
            model.load_lpips()  # fails here, before any work, if the VGG weights are not on disk
    else:
        with open(os.path.join(run.data, "meta.json")) as f:
            meta = json.load(f)  # written by the encode stage: grids, channels, the AE config
        grids = meta["grids"]
        steps, _ = rollout.strategy_steps(cfg, grids[0][0] * grids[0][1])
        chunk = steps[0].selection.shape[1]
        levels = [0] if cfg.dense_framepack else list(range(len(steps[0].selection)))  # what a step reads
        if len(levels) > len(grids):
            raise SystemExit(f"--strategy={cfg.strategy} needs {len(levels)} levels; {run.data} has {len(grids)}")
        dataset = data.ChunkDataset(run.data, train_keys, chunk, levels=levels)
        model = diffusion.VideoDiT(cfg)
        probs = torch.tensor(rollout.step_probabilities(steps), dtype=torch.float64)
        gathers = [step_gather(s, grids, chunk, cfg.dense_framepack) for s in steps]
        if len({len(g["index"]) for g in gathers}) > 1:
            raise SystemExit(f"--strategy={cfg.strategy}: its steps differ in token count, so they cannot "
                             "be stacked into one batch; choose budgets that make them equal (rollout.md)")
    model.to(device)
    if master:
        print(f"{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{len(dataset)} training items, device {device}, world {world}")
    # DDP only syncs gradients of what runs through forward(): the autoencoder's forward is its loss,
    # and diffusion.loss calls the wrapped video model
    wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  broadcast_buffers=False) if world > 1 else model  # our buffers are constant tables
    optimizers = make_optimizers(model, cfg.lr, cfg.weight_decay)

    # resume from the newest checkpoint of this run, if any
    step = 0
    ckpt_path = latest_checkpoint(run.out)
    if ckpt_path:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        step = ckpt["step"]
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    if step >= cfg.steps:
        return model

    sampler = StepBatches(len(dataset), cfg.batch_size, rank, world, run.seed, step, cfg.steps)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=run.workers, pin_memory=device.type == "cuda",
        persistent_workers=False, generator=torch.Generator())  # own generator: leave global RNG alone
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    items_per_step = cfg.batch_size * world
    t0, seen = time.time(), 0
    model.train()
    for batch in loader:
        seed_step(run.seed, rank, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup)
        with autocast:
            if stage == "ae":
                loss, stats = wrapped(batch.to(device, non_blocking=True))
            else:
                inputs = video_inputs(batch, gathers, probs, device)
                loss = diffusion.loss(wrapped, **inputs, cfg_drop=cfg.cfg_dropout)
                stats = {}
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        # the paper clips at 1.0; the authors' released code does not actually apply it (spec/train.md)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        step += 1
        seen += items_per_step

        if master and (step % run.log_every == 0 or step == cfg.steps):
            dt = time.time() - t0
            extra = "".join(f" | {k} {v:.4f}" for k, v in stats.items() if k != "loss")
            print(f"step {step:7d} | loss {loss.item():.5f}{extra} | lr {lr_at(step - 1, cfg.lr, cfg.warmup):.2e}"
                  f" | grad {grad_norm.item():.3f} | {seen / dt:.1f} {'images' if stage == 'ae' else 'seqs'}/s",
                  flush=True)
            t0, seen = time.time(), 0
        if master and stage == "ae" and (step % run.image_every == 0 or step == cfg.steps):
            save_reconstructions(model, run.data, val_keys or train_keys,
                                 os.path.join(run.out, f"recon-{step:08d}.png"), device)
        if master and (step % run.ckpt_every == 0 or step == cfg.steps):
            save_checkpoint(run.out, step, {"model": model.state_dict(), "step": step,
                                            "optimizers": [o.state_dict() for o in optimizers],
                                            "config": resolved}, run.keep)
    if world > 1:
        dist.barrier()
    return model


# ----------------------------------------------------------------------------- video-stage batches


def step_gather(step, grids, chunk, dense):
    """A step's token layout plus, per token, its index into the chunk's latents flattened level-major
    (only level 0 for the dense FramePack model): rollout.token_index with the chunk at frame 0."""
    layout = rollout.step_layout(step.selection, grids, dense=dense)
    index, _ = rollout.token_index(layout, grids, chunk, dense)
    return {k: torch.from_numpy(v) for k, v in {**layout, "index": index}.items()}


def video_inputs(batch, gathers, probs, device):
    """A batch of (video, chunk start) items -> one randomly drawn rollout step per item, gathered
    into the model's token sequence. Steps of one strategy have equal token counts, so they stack."""
    steps = torch.multinomial(probs, len(batch["actions"]), replacement=True)  # group-balanced (spec)
    flat = torch.cat([z.flatten(1, 2) for z in batch["latents"]], dim=1)  # (B, levels·N·T_l, C)
    fields = {k: torch.stack([gathers[s][k] for s in steps.tolist()]) for k in gathers[0]}  # (B, T)
    x = flat.gather(1, fields.pop("index")[..., None].expand(-1, -1, flat.shape[-1]))   # (B, T, C)
    action = batch["actions"].gather(1, fields["frame"])  # action t leads into frame t (spec/data.md)
    out = dict(x=x, action=action, **fields)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


# ----------------------------------------------------------------------------- autoencoder extras


@torch.no_grad()
def save_reconstructions(model, frames_dir, keys, path, device, count=4):
    """Fig. 5-style image: each row one frame (spread over the held-out videos); ground truth, then
    the level-0 output decoded from each single level (finest to coarsest)."""
    from PIL import Image

    index = data.load_index(frames_dir)
    picks = [(keys[i % len(keys)], i * index[keys[i % len(keys)]] // count) for i in range(count)]
    frames = [data.read_frames(frames_dir, key, f, f + 1)[0] for key, f in picks]
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255).to(device)
    was_training = model.training
    model.eval()
    z = model.encode(x)
    columns = [x] + [model.decode(z, level)[0].clamp(0, 1) for level in range(len(z))]
    model.train(was_training)
    grid = torch.cat([torch.cat(list(c), dim=1) for c in columns], dim=2)  # (3, rows·H, cols·W)
    Image.fromarray((grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def encode_store(ae_ckpt, frames_dir, out_dir, batch_size=256):
    """Encode every frame of every video to all levels and write the latent store (stage "encode").
    Videos are split across ranks; a video whose latents are complete is skipped (resumable)."""
    rank, world, device = setup()
    model = load_model(ae_ckpt, device)
    cfg = model.cfg
    index = data.load_index(frames_dir)
    os.makedirs(out_dir, exist_ok=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, done = time.time(), 0
    for key in sorted(index)[rank::world]:
        if data.has_latents(out_dir, key, len(model.grids)):
            continue
        frames = data.read_frames(frames_dir, key, 0, index[key])
        levels = [[] for _ in model.grids]
        for i in range(0, len(frames), batch_size):
            x = torch.from_numpy(frames[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255
            with autocast:
                z = model.encode(x)
            for level, zl in enumerate(z):
                levels[level].append(zl.float().cpu().numpy())
        data.write_latents(out_dir, key, [np.concatenate(l) for l in levels],
                           data.read_actions(frames_dir, key))
        done += index[key]
    if world > 1:
        dist.barrier()
    if rank == 0:
        meta = {"levels": len(model.grids), "grids": [list(g) for g in model.grids],
                "channels": cfg.channels, "frames_dir": os.path.abspath(frames_dir),
                "ae_checkpoint": os.path.abspath(ae_ckpt), "ae_config": dataclasses.asdict(cfg),
                "git_commit": git_commit()}
        write_json(os.path.join(out_dir, "meta.json"), meta)
        write_json(os.path.join(out_dir, "index.json"), index)
        print(f"encoded {done} frames into {out_dir} in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- stages


def run_config(preset, **fields):
    """Logging / checkpoint cadence per preset; `tiny` runs in-process for CPU tests."""
    base = {"paper": RunConfig(), "toy": RunConfig(log_every=50, image_every=500, ckpt_every=500),
            "tiny": RunConfig(log_every=10, image_every=100, ckpt_every=100, workers=0)}[preset]
    return dataclasses.replace(base, **fields)


def stage_overrides(overrides, prefix):
    """For --stage all: `--ae.steps=100` goes to the ae stage, `--video.lr=1e-4` to every video model."""
    return {k[len(prefix) + 1:]: v for k, v in overrides.items() if k.startswith(prefix + ".")}


def run_stage(stage, preset, overrides, root):
    """Run one stage with the preset's defaults plus strict overrides; returns its checkpoint/folder."""
    if stage == "ae":
        cfg, run = tokenizer.ae_config(preset), run_config(preset, out=f"{root}/ae", data=f"{root}/data/train")
        apply_overrides([cfg, run], overrides)
        return train("ae", cfg, run, preset)
    if stage == "encode":
        # --data is one frame store, or a folder of split stores (train/, test/) encoded side by side
        ae = overrides.pop("ae", None) or latest_checkpoint(f"{root}/ae")
        run = run_config(preset, out=f"{root}/latents", data=f"{root}/data")
        apply_overrides([run], overrides)
        if not ae:
            raise SystemExit(f"no autoencoder checkpoint in {root}/ae: run --stage ae first or pass --ae=PATH")
        if os.path.exists(f"{run.data}/index.json"):
            encode_store(ae, run.data, run.out)
        for split in ("train", "test"):
            if os.path.exists(f"{run.data}/{split}/index.json"):
                encode_store(ae, f"{run.data}/{split}", f"{run.out}/{split}")
        return run.out
    if stage == "video":
        strategy = overrides.pop("strategy", "millivid")
        cfg = diffusion.dit_config(preset, strategy=strategy)
        run = run_config(preset, out=f"{root}/video-{strategy}", data=f"{root}/latents/train")
        apply_overrides([cfg, run], overrides)
        return train("video", cfg, run, preset)
    raise ValueError(stage)


def run_all(preset, overrides, root):
    """The main job: data -> autoencoder -> encode -> three video models -> evaluation report.
    Every stage resumes (or is skipped when finished), so rerunning continues where it stopped."""
    rank = int(os.environ.get("RANK", 0))
    maze = data.maze_config(preset)
    apply_overrides([maze], stage_overrides(overrides, "data"))
    for split in ("train", "test"):
        if rank == 0 and not os.path.exists(f"{root}/data/{split}/index.json"):
            data.make_maze(f"{root}/data/{split}", maze, split)
    if dist.is_initialized():
        dist.barrier()
    run_stage("ae", preset, stage_overrides(overrides, "ae"), root)
    run_stage("encode", preset, {}, root)
    for strategy in ("millivid", "framepack", "fullres"):
        run_stage("video", preset, {"strategy": strategy, **stage_overrides(overrides, "video")}, root)
    if rank == 0:
        import evaluate
        cfg = evaluate.eval_config(preset, root=root)
        apply_overrides([cfg], stage_overrides(overrides, "eval"))
        print(f"report: {evaluate.evaluate(cfg)}")


def main(argv):
    stage, preset, overrides = parse_args(argv)
    root = overrides.pop("root", f"runs/{preset}")
    if stage == "all":
        run_all(preset, overrides, root)
    else:
        run_stage(stage, preset, overrides, root)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
