"""Every training stage of MilliVid, as one straight script (paper App. A.2).

    python train.py --stage ae     --preset toy      # hierarchical autoencoder on single frames (§3.1)
    python train.py --stage encode --preset toy      # every frame of every video -> all levels
    python train.py --stage video  --preset toy --strategy=millivid   # video DiT (§3.2)
    python train.py --stage all    --preset toy      # data -> ae -> encode -> 3 video models -> eval
    torchrun --nproc_per_node=8 train.py --stage ae --preset paper      # the real thing

Settings: `AEConfig` (tokenizer.py), `DiTConfig` (diffusion.py), `RolloutConfig` (rollout.py) and `RunConfig`
(here), paper defaults, any field overridden by a strict `--key=value` (data.make_config). The resolved
configuration is printed, written beside the outputs with the git commit, and stored in every checkpoint.

Training recipe (App. A.2, both stages): Muon for every 2-D `nn.Linear` weight and AdamW for the rest,
lr 1e-3, weight decay 0.01, linear warmup from 0 over 2k steps then constant, gradient clipping at 1.0,
bf16 autocast on CUDA (fp32 master weights), no EMA. DDP when launched by torchrun (NCCL on CUDA,
gloo on CPU), otherwise one process on cuda / mps / cpu.
"""
import contextlib
import dataclasses
import fcntl
import glob
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import diffusion
import evaluate
import rollout
import tokenizer


@dataclasses.dataclass
class RunConfig:
    out: str = ""          # this stage's output folder ("" = runs/<preset>/<stage name>)
    data: str = ""         # input store: frames for ae/encode, latents for video ("" = the preset's)
    seed: int = 0                 # initial weights and the data order
    log_every: int = 50           # steps between log lines
    image_every: int = 1000       # steps between reconstruction images (autoencoder)
    ckpt_every: int = 1000        # steps between checkpoints
    keep: int = 2          # newest checkpoints kept on disk
    workers: int = min(4, os.cpu_count() or 1)  # DataLoader worker processes (0 = load in the main process)
    holdout: float = 0.01  # fraction of training videos held out for the periodic reconstruction images
    grad_accum: int = 1    # micro-batches per optimizer step (each batch_size / grad_accum): the same step, less memory
    checkpointing: bool = False  # video: recompute each DiT block in backward (memory of one block, ~1/3 more compute)
    compile: bool = True   # torch.compile the model on CUDA (not on CPUs: compiling there costs more than it saves)

    def __post_init__(self):
        for name in ("log_every", "image_every", "ckpt_every", "keep", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"RunConfig.{name} = {getattr(self, name)}: expected >= 1")
        if self.workers < 0 or not 0 <= self.holdout < 1:
            raise ValueError(f"RunConfig: workers = {self.workers} (expected >= 0), holdout = {self.holdout} "
                             "(expected in [0, 1))")


PRESETS = {"paper": {}, "toy": dict(image_every=500, ckpt_every=500),  # logging / checkpoint cadence per preset
           "tiny": dict(log_every=10, image_every=100, ckpt_every=100, workers=0),  # data in-process (CPU tests)
           "spin": dict(log_every=100, image_every=500, ckpt_every=500, workers=0)}


def run_config(preset="paper", **overrides):
    return data.make_config(RunConfig, PRESETS, preset, overrides)


def parse_command(argv):
    """`--stage ae --preset toy --lr=3e-4 ...` -> (stage, preset, {key: text}); --help lists every setting."""
    args = data.parse_overrides([a for a in argv if a not in ("-h", "--help")])
    stage, preset = args.pop("stage", None), args.pop("preset", "toy")
    if not {"-h", "--help"} & set(argv):
        if stage not in ("ae", "encode", "video", "all"):  # (an unknown preset: each config's maker names it)
            raise SystemExit("--stage must be one of ae, encode, video, all")
        return stage, preset, args
    print(__doc__ + f"\nPresets: {', '.join(PRESETS)}. Settings with their --preset {preset} values (--stage all: "
          "prefix each with its stage, --data.*, --ae.*, --video.*, --eval.*):")
    for what, make in (("data (data.py)", data.maze_config), ("ae (tokenizer.py)", tokenizer.ae_config),
                       ("video (diffusion.py)", diffusion.dit_config),
                       ("video strategy (rollout.py)", rollout.rollout_config),
                       ("every training stage (train.py)", run_config), ("eval (evaluate.py)", evaluate.eval_config)):
        print(f"\n{what}:\n{evaluate.describe(make(preset))}")
    raise SystemExit(0)


def build(preset, overrides, makers, flag=""):
    """{dataclass: its maker} -> [config]: each --key to the one dataclass with that field; a bad one exits, named."""
    parts = {cls: {} for cls in makers}
    for key, value in overrides.items():
        owners = [cls for cls in makers if key in cls.__dataclass_fields__]
        if len(owners) != 1:
            known = sorted({f for cls in makers for f in cls.__dataclass_fields__})
            raise SystemExit(f"--{flag}{key}: {'ambiguous' if owners else 'unknown'} setting; known: {', '.join(known)}"
                             " (python train.py --help lists them)")
        parts[owners[0]][key] = value
    try:
        return [make(preset, **parts[cls]) for cls, make in makers.items()]
    except ValueError as e:
        raise SystemExit(f"error{f' in --{flag}*' if flag else ''}: {e}") from None


# ----------------------------------------------------------------------------- setup; faults: one writer, signals
def setup():
    """DDP when launched by torchrun, else one process on the best device. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else
                                  "mps" if torch.backends.mps.is_available() else "cpu")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_step(seed, rank, step):
    """All randomness of training step `step` on rank `rank` is a pure function of (seed, rank, step):
    resuming from a checkpoint then needs no saved RNG state and reproduces the straight run exactly."""
    torch.manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def make_optimizers(model, lr, weight_decay):
    """Muon for exactly the 2-D weights of nn.Linear layers, AdamW for everything else (App. A.2)."""
    muon_params = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    adamw_params = [p for p in model.parameters() if not any(p is q for q in muon_params)]
    return [Muon(muon_params, lr=lr, weight_decay=weight_decay),
            torch.optim.AdamW(adamw_params, lr=lr, weight_decay=weight_decay)]


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum 0.95, 5 quintic Newton-Schulz steps, decoupled weight decay,
    lr·0.2·sqrt(max(A, B)): `match_rms_adamw`), one batch per matrix shape (paper DiT: 65 matrices, 6 batches)."""

    def __init__(self, params, lr, weight_decay, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            shapes = {}
            for p in group["params"]:
                if p.grad is not None:
                    shapes.setdefault(tuple(p.shape), []).append(p)
            for (A, B), params in shapes.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                # Nesterov: the update is the gradient moved toward the new momentum
                update = newton_schulz(torch.stack(grads).lerp(torch.stack(bufs), group["momentum"]))  # (n, A, B)
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(update.unbind(0)), alpha=-group["lr"] * 0.2 * math.sqrt(max(A, B)))


def newton_schulz(g, steps=5, coefficients=(3.4445, -4.775, 2.0315), eps=1e-7):
    """Muon's orthogonalisation of matrices (n, A, B) (torch's quintic iteration): bfloat16 on a GPU, as torch; float32
    on a CPU, where bfloat16 matmuls run ~20x slower (a 1.6 M-parameter DiT on a CPU core: 0.6 steps/s, float32 3.9)."""
    a, b, c = coefficients
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = g.shape[-2] > g.shape[-1]
    x = x.mT if tall else x                                          # (n, short side, long side)
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)        # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x                 # X <- aX + (bA + cA²)X, A = XXᵀ
    return (x.mT if tall else x).to(g.dtype)


def lr_at(step, lr, warmup):
    """Linear warmup from 0 over `warmup` steps, then constant (App. A.2). Step 0 gets lr/warmup."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


@contextlib.contextmanager
def run_lock(folder, hold=True):
    """One writer per run folder: an exclusive lock on folder/.lock while the block runs, which the OS also releases
    on any exit (kill -9 included); a second writer is refused, naming the holder. A killed writer's temporaries
    (data.atomic_write's *.tmp<pid>*) are removed. hold=False (ranks > 0 of a DDP run): rank 0 holds it for all."""
    if not hold:
        yield
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "a+") as handle:  # closing it releases the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise SystemExit(f"{folder} is in use by another run ({handle.read().strip() or 'unknown'}); wait for it, "
                             "or give this run another --out") from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.ctime()}")
        handle.flush()
        for tmp in glob.glob(os.path.join(folder, "**", "*.tmp[0-9]*"), recursive=True):
            os.remove(tmp)
        yield


class Signals:
    """SIGTERM (a scheduler's warning) or SIGINT (Ctrl-C) sets `caught`: the loop checkpoints its step, exits non-zero;
    a second signal exits at once. The handlers are restored on exit."""

    def __enter__(self):  # (signal.signal returns the handler it replaces)
        self.caught, self.previous = None, {s: signal.signal(s, self.catch) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def catch(self, signum, frame):
        if self.caught is not None:
            raise SystemExit(f"{signal.Signals(signum).name} again: stopping now, without a checkpoint")
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_signals(worker_id):  # DataLoader workers: the main process decides when to stop
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------- training: the data, then the loop
def split_keys(keys, holdout=0.01, seed=0):
    """Deterministic split: sorted keys, seeded shuffle, a fixed fraction (at least one) held out."""
    keys = sorted(keys)
    held = set(np.random.default_rng(seed).permutation(len(keys))[:max(1, round(holdout * len(keys)))])
    return ([k for i, k in enumerate(keys) if i not in held], [k for i, k in enumerate(keys) if i in held])


class FrameDataset(torch.utils.data.Dataset):
    """Every (video, frame) of a frame store; item = float32 (3, H, W) in [0, 1]. Deterministic."""
    def __init__(self, root, keys=None):
        index = data.load_index(root)
        self.root, self.keys = root, sorted(index) if keys is None else list(keys)
        self.ends = np.cumsum([0] + [index[k] for k in self.keys])

    def __len__(self):
        return int(self.ends[-1])

    def __getitem__(self, i):
        v, f = rollout.locate(self.ends, i)
        frame = data.read_frames(self.root, self.keys[v], f, f + 1)[0]
        return torch.from_numpy(frame).permute(2, 0, 1).float() / 255  # (3, H, W)

    def item_name(self, i):
        v, f = rollout.locate(self.ends, i)
        return f"{self.keys[v]} frame {f}"


class StepBatches(torch.utils.data.Sampler):
    """Batches of dataset indices as a pure function of the step (exact resume): epoch e is a seeded permutation,
    step s takes global batch s mod (batches per epoch), and each rank takes its slice of it."""

    def __init__(self, n, batch_size, rank, world, seed, start_step, num_steps, probs=None):
        self.per_epoch = n // (batch_size * world)
        if self.per_epoch == 0:
            raise SystemExit(f"dataset has {n} items, fewer than one global batch ({batch_size} x {world} ranks): "
                             "lower --batch_size")
        self.n, self.b, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop, self.probs = start_step, num_steps, probs

    def __len__(self):
        return self.stop - self.start

    def batch(self, step):  # this rank's dataset indices at `step`
        epoch = step // self.per_epoch
        if getattr(self, "_epoch", None) != epoch:  # one seeded permutation per epoch, cached
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        first = (step % self.per_epoch) * self.b * self.world + self.rank * self.b
        return self._perm[first:first + self.b].tolist()

    def rollout_steps(self, step):
        """Each item's rollout step at `step`, drawn with `probs` (§3.2): a pure function of (seed, step, rank) too."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_000_003 + self.rank)
        return torch.multinomial(self.probs, self.b, replacement=True, generator=g).tolist()

    def __iter__(self):  # video: (item, rollout step) pairs, so a worker reads only that step's cells
        for step in range(self.start, self.stop):
            yield self.batch(step) if self.probs is None else list(zip(self.batch(step), self.rollout_steps(step)))


def train(stage, cfg, run, preset, roll=None):
    """Stage "ae" (cfg an AEConfig) or "video" (cfg a DiTConfig, roll the RolloutConfig it learns), as run.out's
    only writer, stopping cleanly on SIGTERM/SIGINT. Returns the model (as the newest checkpoint in run.out)."""
    if not os.path.exists(os.path.join(run.data, "index.json")):  # written last: the store is complete
        raise SystemExit(f"{run.data}: no complete {'frame' if stage == 'ae' else 'latent'} store (no index.json); "
                         f"make it first: python train.py --stage {'all' if stage == 'ae' else 'encode'} ...")
    rank, world, device = setup()
    with run_lock(run.out, hold=rank == 0), Signals() as signals:
        return train_loop(stage, cfg, run, preset, roll, rank, world, device, signals)


def train_loop(stage, cfg, run, preset, roll, rank, world, device, signals):
    """config -> data -> model -> optimizer -> loop with "every N steps" blocks -> checkpoint."""
    master = rank == 0
    if stage == "video" and (roll is None or roll.dense != cfg.dense):
        raise ValueError(f"video stage: DiTConfig.dense={cfg.dense} must match the rollout strategy "
                         f"({'none given' if roll is None else roll.strategy})")
    meta = json.load(open(os.path.join(run.data, "meta.json")))  # the store's provenance (encode: grids, AE)
    resolved = {"stage": stage, "format": tokenizer.CHECKPOINT_FORMAT, "preset": preset,
                "model": dataclasses.asdict(cfg), "run": dataclasses.asdict(run), "git_commit": tokenizer.git_commit(),
                "world_size": world}
    if stage == "video":  # the strategy it learns, and which autoencoder made the latents it learns from
        resolved |= {"rollout": dataclasses.asdict(roll), "latents_ae_sha256": meta.get("ae_sha256")}
    if master:
        print(json.dumps(resolved, indent=2))

    torch.manual_seed(run.seed)  # the same initial weights on every rank and in every (re)start
    train_keys, val_keys = split_keys(data.load_index(run.data), holdout=run.holdout, seed=run.seed)
    if stage == "ae":  # data: single random frames; for the video model, (video, chunk start) pairs
        dataset = FrameDataset(run.data, train_keys)
        model = tokenizer.HierarchicalAutoencoder(cfg)
        if cfg.lpips_weight > 0:
            model.load_lpips()  # fails here, before any work, if the VGG weights are not on disk
    else:
        grids = meta["grids"]
        steps, _ = rollout.strategy_steps(roll, grids[0][0] * grids[0][1])
        chunk, levels = steps[0].selection.shape[1], 1 if roll.dense else len(steps[0].selection)  # what a step reads
        if levels > len(grids):
            raise SystemExit(f"--strategy={roll.strategy} needs {levels} levels; {run.data} has {len(grids)}")
        dataset = rollout.ChunkDataset(run.data, train_keys, chunk, steps, grids, roll.dense)
        model = diffusion.VideoDiT(cfg)
        model.checkpointing = run.checkpointing
        probs = torch.tensor(rollout.step_probabilities(steps), dtype=torch.float64)
        gathers = [rollout.step_tokens(s, grids, chunk, roll.dense) for s in steps]  # the tokens of each step
        packing = rollout.dense_packing(steps[0], grids) if roll.dense else None  # (its one step's)
        if len({len(g["index"]) for g in gathers}) > 1:
            raise SystemExit(f"--strategy={roll.strategy}: its steps differ in token count, so they cannot "
                             "be stacked into one batch; choose budgets that make them equal (rollout.py)")
    model.to(device)
    if cfg.batch_size % run.grad_accum:
        raise SystemExit(f"--grad_accum={run.grad_accum} must divide the batch size {cfg.batch_size}")
    if run.compile and device.type == "cuda":  # the DiT; the autoencoder's encoder and decoder (LPIPS stays eager)
        for part in [model] if stage == "video" else [model.encoder, model.decoder]:
            part.compile()
    if master:
        print(f"{stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{len(dataset)} training items, device {device}, world {world}")
        if stage == "video":  # what must fit: weights, gradients, optimizer state and the activations kept for backward
            tokens = int(rollout.level_tokens(steps[0].selection, grids[0][0] * grids[0][1], roll.dense).sum())
            need = diffusion.train_memory(cfg, cfg.batch_size // run.grad_accum, tokens, run.checkpointing)
            print(f"expected peak memory per device: {need / 2**30:.2f} GiB (eager; --checkpointing=true and "
                  f"--grad_accum lower it)")
        if device.type == "cpu" and preset not in ("tiny", "spin"):  # the log lines' ETA will say how long, in hours
            print(f"note: --preset {preset} is sized for a GPU; on this CPU it runs many hours (tiny: minutes)")
    # DDP syncs gradients of what runs through forward(): the AE's forward is its loss, diffusion.loss calls the DiT
    wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  broadcast_buffers=False) if world > 1 else model  # our buffers are constant tables
    optimizers = make_optimizers(model, cfg.lr, cfg.weight_decay)

    step, seconds = 0, 0.0  # seconds: training time so far, kept in every checkpoint
    if tokenizer.newest_checkpoint(run.out):  # resume from the newest loadable one (tokenizer.read_checkpoint)
        ckpt = tokenizer.read_checkpoint(run.out, stage)
        made = ckpt["config"]  # resuming with other settings (more steps aside) would silently mix two runs
        changed = sorted(k for k, v in resolved["model"].items() if k != "steps" and made["model"].get(k) != v)
        if changed or made.get("latents_ae_sha256") != resolved.get("latents_ae_sha256"):
            why = ", ".join(changed) or "latents of another autoencoder"
            raise SystemExit(f"{ckpt['path']}: made with other settings ({why}); move {run.out} away to start "
                             "over, or give this run another --out")
        model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
        step, seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        if master:
            print(f"resumed from {ckpt['path']} at step {step}")
    if master:  # written once the checkpoints are known to agree with it
        data.write_json(os.path.join(run.out, "config.json"), resolved)
    if step >= cfg.steps:
        return model

    def check_finite():  # on every rank, at the same steps; a non-finite step is never checkpointed
        bad = torch.stack([first_bad, (first_bad >= 0).to(first_bad.dtype)])
        if world > 1:
            dist.all_reduce(bad[1:], op=dist.ReduceOp.MAX)
        if bad[1] > 0:
            where = f"step {int(bad[0]) + 1}, batch {', '.join(map(dataset.item_name, sampler.batch(int(bad[0]))))}" \
                if bad[0] >= 0 else "another rank's batch"
            raise SystemExit(f"non-finite loss or gradient norm at {where}: training stopped; the checkpoints "
                             f"in {run.out} are all from finite steps (inspect that data, then rerun to resume)")
    sampler = StepBatches(len(dataset), cfg.batch_size, rank, world, run.seed, step, cfg.steps,
                          None if stage == "ae" else probs)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=run.workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=ignore_signals,
                                         generator=torch.Generator())  # own generator: leave global RNG alone
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0, seen, progress = time.time(), 0, data.Progress("steps", cfg.steps - step, every=0, show=master)
    hardware = f"{world} x {torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type}"
    first_bad = torch.tensor(-1, device=device)  # the first step with a non-finite loss or gradient norm
    model.train()
    for batch in loader:
        seed_step(run.seed, rank, step)
        lr = lr_at(step, cfg.lr, cfg.warmup)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                group["lr"] = lr
        # the whole batch's randomness is drawn first, then each micro-batch takes its slice: N micro-batches of
        # B/N make the same step as one batch of B (each loss weighted by its share of the batch's loss terms)
        if stage == "ae":
            x = batch.to(device, non_blocking=True)
            level = torch.randint(cfg.levels, (len(x),), device=device)  # the kept level (tokenizer's loss)
        else:
            inputs = rollout.training_batch(batch, gathers, device)
            noise, denoised = diffusion.loss_noise(inputs["x"]), inputs["denoised"].float()
        loss, stats, size = 0.0, {}, cfg.batch_size // run.grad_accum
        for i, part in enumerate(slice(j, j + size) for j in range(0, cfg.batch_size, size)):
            with wrapped.no_sync() if world > 1 and i < run.grad_accum - 1 else contextlib.nullcontext():
                with autocast:  # DDP syncs gradients in the last micro-batch's backward only
                    if stage == "ae":
                        part_loss, part_stats = wrapped(x[part], level[part])
                        weight, stats = 1 / run.grad_accum, {k: stats.get(k, 0) + v / run.grad_accum
                                                             for k, v in part_stats.items()}
                    else:
                        part_loss = diffusion.loss(wrapped, **{k: v[part] for k, v in inputs.items()},
                                                   cfg_drop=cfg.cfg_dropout, packing=packing,
                                                   noise=tuple(n[part] for n in noise))
                        weight = denoised[part].sum() / denoised.sum()
                (part_loss * weight).backward()
            loss = loss + (part_loss * weight).detach()
        # the paper clips at 1.0; the authors' released code does not actually apply it (README)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
        # the finite-loss guard stays on the device (no host sync per step); check_finite reads it
        finite = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        first_bad = torch.where((first_bad < 0) & ~finite, step, first_bad)
        step += 1
        seen += cfg.batch_size * world
        progress.update()
        stop = torch.tensor(float(signals.caught is not None), device=device)
        if world > 1:  # all ranks stop after the same step: one 4-byte all_reduce per step
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        stop = bool(stop) if world > 1 else signals.caught is not None
        if step % run.log_every == 0 or step % run.ckpt_every == 0 or step == cfg.steps or stop:
            check_finite()
        if master and (step % run.log_every == 0 or step == cfg.steps):
            extra = "".join(f" | {k} {v:.4f}" for k, v in stats.items() if k != "loss")
            progress.write(f"step {step:7d} | loss {loss.item():.5f}{extra} | lr {lr:.2e} | grad {grad_norm.item():.3f}"
                           f" | {seen / (time.time() - t0):.1f} {'images' if stage == 'ae' else 'seqs'}/s"
                           f" | {progress.line()}")
            t0, seen = time.time(), 0
        if master and stage == "ae" and (step % run.image_every == 0 or step == cfg.steps):  # Fig. 5-style, held out
            x = tokenizer.spread_frames(run.data, val_keys or train_keys, 4).to(device)
            images = tokenizer.level_psnr(model.eval(), x)[1]  # (without gradients)
            model.train()
            tokenizer.save_levels_image(os.path.join(run.out, f"recon-{step:08d}.png"), x, images)
        if master and (step % run.ckpt_every == 0 or step == cfg.steps or stop):
            state = {"model": model.state_dict(), "step": step, "optimizers": [o.state_dict() for o in optimizers],
                     "config": resolved, "device": hardware, "seconds": seconds + time.perf_counter() - progress.start}
            path = os.path.join(run.out, f"ckpt-{step:08d}.pt")
            data.atomic_write(path, lambda tmp: torch.save(state, tmp))  # never a half-written checkpoint
            for old in sorted(glob.glob(os.path.join(run.out, "ckpt-*.pt")))[:-run.keep]:  # keep the newest run.keep
                os.remove(old)
        if stop:
            if world > 1:
                dist.barrier()
            raise SystemExit(f"stopped by {signals.caught or 'another rank'} after step {step}"
                             + (f": checkpoint {path}" if master else "") + "; rerun the same command to resume")
    progress.close()
    if world > 1:
        dist.barrier()
    return model


# ----------------------------------------------------------------------------- the stages: encode, then all of them
@torch.no_grad()
def encode_store(ae_ckpt, frames_dir, out_dir, batch_size=256):
    """Stage "encode", videos split across ranks. meta.json (written first) names the autoencoder by content hash:
    videos it encoded are skipped (resumable), another's store is re-encoded; index.json (written last) ends it."""
    rank, world, device = setup()
    model = tokenizer.HierarchicalAutoencoder.from_checkpoint(ae_ckpt, device)
    index, meta_path = data.load_index(frames_dir), os.path.join(out_dir, "meta.json")
    meta = {"levels": len(model.grids), "grids": [list(g) for g in model.grids], "channels": model.cfg.channels,
            "frames_dir": os.path.abspath(frames_dir), "ae_checkpoint": os.path.abspath(model.source),
            "ae_sha256": tokenizer.sha256(model.source), "ae_config": dataclasses.asdict(model.cfg),
            "git_commit": tokenizer.git_commit()}
    with run_lock(out_dir, hold=rank == 0):
        old = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        if rank == 0 and old.get("ae_sha256") != meta["ae_sha256"]:
            if old:
                print(f"{out_dir}: encoded by another autoencoder ({old.get('ae_checkpoint')}): re-encoding it all")
            Path(out_dir, "index.json").unlink(missing_ok=True)  # unmark the store, then every video in it
            for marker in glob.glob(os.path.join(out_dir, "**", "actions.npy"), recursive=True):
                os.remove(marker)
            data.write_json(meta_path, meta)
        if world > 1:
            dist.barrier()
        t0, done, mine = time.perf_counter(), 0, sorted(index)[rank::world]
        progress = data.Progress(f"encode {out_dir}: videos", len(mine), show=rank == 0)
        for key in mine:
            progress.update()
            if tokenizer.has_latents(out_dir, key, len(model.grids)):
                continue
            frames = torch.from_numpy(data.read_frames(frames_dir, key, 0, index[key]))  # (F, H, W, 3) uint8
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):  # a batch at a time
                z = [model.encode(x.to(device).permute(0, 3, 1, 2).float() / 255) for x in frames.split(batch_size)]
            levels = [torch.cat(zl).float().cpu().numpy() for zl in zip(*z)]  # per level (F, T_l, C)
            tokenizer.write_latents(out_dir, key, levels, data.read_actions(frames_dir, key))
            done += index[key]
        progress.close()
        if world > 1:
            dist.barrier()
        if rank == 0:
            data.write_json(os.path.join(out_dir, "index.json"), index)
            print(f"encoded {done} frames into {out_dir} in {time.perf_counter() - t0:.1f}s")


def stage_configs(stage, preset, overrides, root, flag=""):
    """A stage's (ae, encode, video) configs: the preset's defaults, then the strict overrides (build)."""
    if stage == "ae":
        return build(preset, {"out": f"{root}/ae", "data": f"{root}/data/train", **overrides},
                     {tokenizer.AEConfig: tokenizer.ae_config, RunConfig: run_config}, flag)
    if stage == "encode":  # (--ae=PATH picks the autoencoder checkpoint)
        return build(preset, {"out": f"{root}/latents", "data": f"{root}/data",
                              **{k: v for k, v in overrides.items() if k != "ae"}}, {RunConfig: run_config}, flag)
    if "dense" in overrides:  # video
        raise SystemExit(f"--{flag}dense is set by --strategy (framepack: the dense baseline); do not pass it")
    makers = {diffusion.DiTConfig: diffusion.dit_config, rollout.RolloutConfig: rollout.rollout_config,
              RunConfig: run_config}
    cfg, roll, run = build(preset, {"data": f"{root}/latents/train", **overrides}, makers, flag)
    cfg = dataclasses.replace(cfg, dense=roll.dense)  # the input stage the strategy needs
    return cfg, roll, dataclasses.replace(run, out=run.out or f"{root}/video-{roll.strategy}")


def run_stage(stage, preset, overrides, root):
    """Run one stage with the preset's defaults plus strict overrides; returns its model or folder."""
    configs = stage_configs(stage, preset, overrides, root)
    if stage == "ae":
        return train("ae", *configs, preset)
    if stage == "encode":  # --data is one frame store, or a folder of split stores (train/, test/) encoded side by side
        ae, (run,) = overrides.get("ae") or tokenizer.newest_checkpoint(f"{root}/ae"), configs
        if not ae:
            raise SystemExit(f"no autoencoder checkpoint in {root}/ae: run --stage ae first or pass --ae=PATH")
        stores = [s for s in ("", "/train", "/test") if os.path.exists(f"{run.data}{s}/index.json")]
        if not stores:
            raise SystemExit(f"{run.data}: no complete frame store there or in train/, test/ (no index.json)")
        for s in stores:
            encode_store(ae, run.data + s, run.out + s)
        return run.out
    cfg, roll, run = configs  # video
    return train("video", cfg, run, preset, roll)


def run_all(preset, overrides, root):
    """The main job (module docstring): every setting is checked before any work; each stage resumes or is skipped."""
    rank = int(os.environ.get("RANK", 0))
    stray = [k for k in overrides if k.split(".")[0] not in ("data", "ae", "video", "eval")]
    if stray:
        raise SystemExit(f"--{stray[0]}: with --stage all, give each setting its stage: --data.*, --ae.*, --video.*"
                         f" or --eval.* (e.g. --ae.{stray[0]}=...)")
    given = {s: {k[len(s) + 1:]: v for k, v in overrides.items() if k.startswith(s + ".")}
             for s in ("data", "ae", "video", "eval")}  # `--ae.steps=100` to the ae stage, `--video.lr` to every video
    maze, = build(preset, given["data"], {data.MazeConfig: data.maze_config}, "data.")
    evaluation, = build(preset, {"root": root, **given["eval"]}, {evaluate.EvalConfig: evaluate.eval_config}, "eval.")
    ae = stage_configs("ae", preset, given["ae"], root, "ae.")
    videos = [stage_configs("video", preset, {"strategy": s, "seed": k, "out": evaluate.video_folder(root, s, k),
                                              **given["video"]}, root, "video.")
              for k in evaluation.train_seeds for s in ("millivid", "framepack", "fullres")]  # Table 1, each seed
    wanted = {k: v for k, v in dataclasses.asdict(maze).items() if k != "workers"}  # what make_maze records
    for store in (f"{root}/data/{split}" for split in ("train", "test")):
        if not os.path.exists(f"{store}/index.json"):
            if rank == 0:
                data.make_maze(store, maze, store.rsplit("/", 1)[1])
        elif (made := json.load(open(f"{store}/meta.json")).get("config") or {}) != wanted:  # never reuse silently
            diff = ", ".join(f"{k}={made.get(k)} (now {v})" for k, v in wanted.items() if made.get(k) != v)
            raise SystemExit(f"{store} was made with other data settings: {diff}; delete it or use another --root")
    if dist.is_initialized():
        dist.barrier()
    train("ae", *ae, preset)
    run_stage("encode", preset, {}, root)
    for cfg, roll, run in videos:
        train("video", cfg, run, preset, roll)
    if rank == 0:
        print(f"report: {evaluate.evaluate(evaluation)}")


def main(argv):
    stage, preset, overrides = parse_command(argv)
    root = overrides.pop("root", f"runs/{preset}")
    try:
        run_all(preset, overrides, root) if stage == "all" else run_stage(stage, preset, overrides, root)
    except OSError as e:  # a full disk, a read-only folder (data.atomic_write), a missing file: one line
        raise SystemExit(f"error: {e}") from None
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
