"""Importing the authors' released checkpoints and latent files (tokenizer.from_official, diffusion.from_official,
tokenizer.read_pyramid). The official names and shapes below are written out from the authors' modules (their
DiTWrapper / DiTAdaptive / Encoder / Decoder), not derived from our mapping, so a wrong rule fails here."""
import json

import numpy as np
import pytest
import torch

import diffusion
import tokenizer


def block(prefix, D, heads, adaln):  # one authors' transformer block: Attention (qkv, q/k RMSNorm, proj), timm Mlp
    names = {"attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.q_norm.weight": (D // heads,),
             "attn.k_norm.weight": (D // heads,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
             "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)}
    if adaln:
        names |= {"adaLN_modulation.1.weight": (6 * D, D), "adaLN_modulation.1.bias": (6 * D,)}
    return {prefix + k: v for k, v in names.items()}


def official_video(depth, D, heads, C, levels, dense):
    """Keys and shapes of an authors' video checkpoint's "model" (ModelVideoUniversal / ModelVideoFramePack)."""
    shapes = {k: v for i in range(depth) for k, v in block(f"dit.dit.dit.blocks.{i}.", D, heads, True).items()}
    shapes |= {"dit.dit.time_embedding.mlp.0.weight": (D, 256), "dit.dit.time_embedding.mlp.0.bias": (D,),
               "dit.dit.time_embedding.mlp.2.weight": (D, D), "dit.dit.time_embedding.mlp.2.bias": (D,),
               "dit.dit.level_embedding.weight": (levels, D), "dit.dit.action_encoder.action_embedding.weight": (3, D),
               "dit.unpatchify.linear.weight": (C, D), "dit.unpatchify.linear.bias": (C,),
               "dit.unpatchify.adaLN_modulation.1.weight": (2 * D, D), "dit.unpatchify.adaLN_modulation.1.bias": (2 * D,)}
    if dense:  # one packing Linear per group k
        return shapes | {f"dit.patchify.{k}.{n}": s for k in range(levels)
                         for n, s in (("weight", (D, C * 4 ** k)), ("bias", (D,)))}
    return shapes | {"dit.patchify.weight": (D, C), "dit.patchify.bias": (D,)}


def official_ae(depth, D, heads, C, levels, p):
    """Keys and shapes of the authors' autoencoder checkpoint's "model" (ModelAutoencoder), LPIPS included."""
    shapes = {}
    for part, adaln in (("encoder", False), ("decoder", True)):
        shapes |= {k: v for i in range(depth) for k, v in block(f"{part}.transformer.blocks.{i}.", D, heads, adaln).items()}
        shapes[f"{part}.level_embedding.weight"] = (levels, D)
    return shapes | {"encoder.patchify.weight": (D, 3 * p * p), "encoder.patchify.bias": (D,),
                     "encoder.bottleneck.weight": (C, D), "encoder.bottleneck.bias": (C,),
                     "decoder.unbottleneck.weight": (D, C), "decoder.unbottleneck.bias": (D,),
                     "decoder.unpatchify.weight": (3 * p * p, D), "decoder.unpatchify.bias": (3 * p * p,),
                     "lpips.net.slice1.0.weight": (64, 3, 3, 3), "lpips.lin0.model.1.weight": (1, 64, 1, 1)}


def random_state(shapes, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(0)
    return {k: scale * torch.randn(s, generator=g) if device == "cpu" else torch.empty(s, device=device)
            for k, s in shapes.items()}


@pytest.mark.parametrize("dense,params", [(False, 129.6e6), (True, 131.6e6)])
def test_paper_video_checkpoint_covers_every_parameter(dense, params):
    state = random_state(official_video(12, 768, 12, 32, 4, dense), "meta")
    assert abs(sum(t.numel() for t in state.values()) / params - 1) < 0.01  # the paper's DiT-B sizes
    with torch.device("meta"):
        model = diffusion.VideoDiT(diffusion.dit_config("paper", dense=dense))
    tokenizer.load_official(model, state, diffusion.OFFICIAL_DIT)  # every key placed, every parameter given


def test_paper_autoencoder_checkpoint_covers_every_parameter():
    state = random_state(official_ae(12, 768, 12, 32, 4, 16), "meta")
    with torch.device("meta"):
        model = tokenizer.HierarchicalAutoencoder(tokenizer.ae_config("paper"))
    tokenizer.load_official(model, state, tokenizer.OFFICIAL_AE, skip=("lpips.",))
    assert abs(tokenizer.num_params(model) / 213.8e6 - 1) < 0.01


def test_video_import_places_values_and_runs():
    cfg = diffusion.dit_config("tiny", dense=True)
    state = random_state(official_video(cfg.depth, cfg.width, cfg.heads, cfg.channels, cfg.levels, True))
    state["decoder.unpatchify.weight"] = torch.zeros(3)  # their decoder copy: left for tokenizer.from_official
    model = diffusion.from_official({"model": state}, cfg)
    pairs = [(model.blocks[1].attn.qkv.weight, "dit.dit.dit.blocks.1.attn.qkv.weight"),
             (model.blocks[0].adaLN_modulation[1].bias, "dit.dit.dit.blocks.0.adaLN_modulation.1.bias"),
             (model.t_embed[2].weight, "dit.dit.time_embedding.mlp.2.weight"),
             (model.level_embed.weight, "dit.dit.level_embedding.weight"),
             (model.action_embed.weight, "dit.dit.action_encoder.action_embedding.weight"),
             (model.embed[2].weight, "dit.patchify.2.weight"), (model.final.out.bias, "dit.unpatchify.linear.bias"),
             (model.final.adaLN_modulation[1].weight, "dit.unpatchify.adaLN_modulation.1.weight")]
    assert all(torch.equal(ours, state[theirs]) for ours, theirs in pairs) and not model.training
    # the default config is the paper's, dense because the file packs context with one Linear per group
    first = {"dit.patchify.0.weight": state["dit.patchify.0.weight"]}
    with pytest.raises(ValueError, match=r"dit.patchify.0.weight has shape \(48, 8\), embed.0.weight here \(768, 32\)"):
        diffusion.from_official(first | state)


def test_import_errors_name_the_key_and_shapes():
    cfg = diffusion.dit_config("tiny")
    good = random_state(official_video(cfg.depth, cfg.width, cfg.heads, cfg.channels, cfg.levels, False))
    with pytest.raises(KeyError, match="dit.dit.level_embedding.weight"):
        diffusion.from_official({k: v for k, v in good.items() if k != "dit.dit.level_embedding.weight"}, cfg)
    with pytest.raises(ValueError, match=r"dit.patchify.weight has shape \(48, 9\), embed.weight here \(48, 8\)"):
        diffusion.from_official(good | {"dit.patchify.weight": torch.zeros(48, 9)}, cfg)
    with pytest.raises(KeyError, match="dit.dit.extra.weight"):
        diffusion.from_official(good | {"dit.dit.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt.*charatan/millivid"):
        diffusion.from_official("nowhere.ckpt", cfg)


def test_a_checkpoint_with_more_than_tensors_is_refused_with_advice(tmp_path):
    """Only tensors and plain containers are unpickled (weights_only): anything else is named, with the way out."""
    cfg = diffusion.dit_config("tiny")
    state = random_state(official_video(cfg.depth, cfg.width, cfg.heads, cfg.channels, cfg.levels, False))
    torch.save({"model": state, "train_loader": {"seen": np.float64(3.0)}}, tmp_path / "full.ckpt")
    with pytest.raises(ValueError, match=r"full.ckpt: holds objects beyond tensors .*weights_only=False"):
        diffusion.from_official(str(tmp_path / "full.ckpt"), cfg)


def test_autoencoder_import_and_decoder_from_a_video_checkpoint(tmp_path):
    cfg = tokenizer.ae_config("tiny")
    state = random_state(official_ae(cfg.depth, cfg.width, cfg.heads, cfg.channels, cfg.levels, cfg.patch_size))
    torch.save({"model": state, "step": 128_000}, tmp_path / "ae.ckpt")
    ae = tokenizer.from_official(str(tmp_path / "ae.ckpt"), cfg)  # a file path; lpips.* left out
    assert torch.equal(ae.encoder.patch_embed.proj.weight, state["encoder.patchify.weight"])
    assert torch.equal(ae.decoder.head.weight, state["decoder.unpatchify.weight"])
    assert torch.equal(ae.decoder.in_proj.bias, state["decoder.unbottleneck.bias"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z = ae.encode(x)
        # a video checkpoint: dit.* plus the decoder's copy; the decoder alone comes out and decodes the same
        video = {"dit.patchify.weight": torch.zeros(1)} | {k: v for k, v in state.items() if k.startswith("decoder.")}
        dec = tokenizer.from_official(video, cfg)
        assert dec.encoder is None and torch.equal(dec.decode(z, 1)[0], ae.decode(z, 1)[0])
    with pytest.raises(ValueError, match="without its encoder"):
        dec.encode(x)


def write_pyramid_like_the_authors(path, levels, actions):
    """Their format_pyramid.save_pyramid, restated: per frame the bytes of each level (C, h, w) in bf16 and the
    float32 actions; section s concatenates, frame by frame, the blobs of levels s.. and the actions."""
    blobs = [np.ascontiguousarray(z.view(torch.int16).numpy()).view(np.uint8).reshape(len(actions), -1) for z in levels]
    blobs.append(actions.numpy().view(np.uint8).reshape(len(actions), -1))
    with open(path, "wb") as f:
        for s in range(len(levels)):
            f.write(np.concatenate(blobs[s:], axis=1).tobytes())


def test_pyramid_round_trip_and_truncation(tmp_path):
    g = torch.Generator().manual_seed(0)
    grids, C, F = [(4, 4), (2, 2), (1, 1)], 8, 5
    levels = [torch.randn(F, C, h, w, generator=g).bfloat16() for h, w in grids]  # theirs: (F, C, h, w) bf16
    actions = torch.randn(F, 6, generator=g)
    actions[:, 0] = torch.tensor([0, 1, 2, 2, 0])
    write_pyramid_like_the_authors(tmp_path / "000.pyramid", levels, actions)
    z, a = tokenizer.read_pyramid(tmp_path / "000.pyramid", grids, C)
    for ours, theirs, (h, w) in zip(z, levels, grids):  # ours (F, T_l, C), tokens row-major: exactly their values
        assert ours.dtype == np.float32 and np.array_equal(ours, theirs.float().flatten(2).transpose(1, 2).numpy())
    assert np.array_equal(a, actions.numpy())
    data = (tmp_path / "000.pyramid").read_bytes()
    (tmp_path / "cut.pyramid").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.pyramid.*truncated"):
        tokenizer.read_pyramid(tmp_path / "cut.pyramid", grids, C)


def test_evaluate_the_authors_release(tmp_path):
    """`python evaluate.py --preset tiny --official DIR` on a release laid out as the authors' (their file names,
    key names, .pyramid latents with MineRL poses), of tiny random models: the report is written for their three
    models; without frames/ it says the decoded ground-truth latents stand in; a missing file is named."""
    import evaluate
    ae, dit = tokenizer.ae_config("tiny"), diffusion.dit_config("tiny")
    state = official_ae(ae.depth, ae.width, ae.heads, ae.channels, ae.levels, ae.patch_size)
    torch.save({"model": random_state(state, scale=0.05)}, tmp_path / evaluate.OFFICIAL["ae"])
    for m in ("millivid", "framepack", "fullres"):
        state = official_video(dit.depth, dit.width, dit.heads, dit.channels, dit.levels, m == "framepack")
        torch.save({"model": random_state(state, scale=0.05)}, tmp_path / evaluate.OFFICIAL[m])
    latents, g, index = tmp_path / evaluate.OFFICIAL["latents"] / "008", torch.Generator().manual_seed(0), {}
    latents.mkdir(parents=True)
    for i, frames in enumerate((96, 100, 96, 50)):  # the last is too short for the protocol: left out
        poses = torch.zeros(frames, 6)
        poses[:, 0] = torch.randint(0, 3, (frames,), generator=g).float()
        write_pyramid_like_the_authors(latents / f"{i:03d}.pyramid", [
            torch.rand(frames, ae.channels, h, w, generator=g).bfloat16() for h, w in [(4, 4), (2, 2), (1, 1)]], poses)
        index[f"008/{i:03d}"] = frames
    (latents.parent / "index_unfiltered.json").write_text(json.dumps(index))
    cfg = evaluate.eval_config("tiny", official=str(tmp_path), num_samples=1, sampling_steps=2, lpips=False)
    report = open(evaluate.evaluate(cfg, "tiny")).read()
    assert all(f"| {m} |" in report for m in ("millivid", "framepack", "fullres"))
    assert "decoded ground-truth latents stand in" in report and "3 test videos" in report
    (tmp_path / evaluate.OFFICIAL["fullres"]).unlink()
    with pytest.raises(FileNotFoundError, match="full_resolution_rollout_192k.ckpt: missing; download"):
        evaluate.evaluate(cfg, "tiny")
