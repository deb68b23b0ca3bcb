"""Tests for tokenizer.py against hand-computed values (paper §3.1, App. A.2). CPU only, `tiny` preset
unless a test is about another preset's numbers."""
import pytest
import torch

from tokenizer import (AEConfig, HierarchicalAutoencoder, ae_config, box_pyramid, level_psnr, main,
                       mean_pool_tokens, num_params, patchify, pyramid_layout, pyramid_mse, unpatchify)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the tiny models are far too small to gain from threads; on the shared CPU two threads were 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return HierarchicalAutoencoder(ae_config("tiny"))


def frames(B, size, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config and sizes

def test_paper_defaults_and_preset_errors():
    cfg = AEConfig()
    assert (cfg.image_size, cfg.patch_size, cfg.levels, cfg.channels) == (256, 16, 4, 32)
    assert (cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio) == (768, 12, 12, 4.0)
    assert (cfg.lpips_weight, cfg.variant) == (0.05, "hierarchical")
    assert (cfg.batch_size, cfg.steps, cfg.lr, cfg.weight_decay, cfg.warmup) == (224, 128_000, 1e-3, 0.01, 2000)
    assert ae_config("toy", lr=2e-3, steps=7).lr == 2e-3
    with pytest.raises(ValueError, match="unknown preset"):
        ae_config("huge")
    with pytest.raises(ValueError, match="unknown key 'widht'"):
        ae_config("tiny", widht=8)
    with pytest.raises(ValueError, match="should be of type int"):
        ae_config("tiny", depth=2.5)
    with pytest.raises(ValueError, match="variant"):
        ae_config("tiny", variant="pooled")
    with pytest.raises(ValueError, match="image_size"):
        ae_config("tiny", image_size=40)       # 40 is not a multiple of 8·2² = 32


def test_paper_parameter_count():
    # hand count for ViT-B / DiT-B, D = 768, MLP 3072, head dim 64, C = 32, patch 3·16·16 = 768, L = 4
    D, M, hd, C, P, L = 768, 3072, 64, 32, 768, 4
    attn = (D * 3 * D + 3 * D) + (D * D + D) + 2 * hd    # qkv, proj, q/k RMS-norm gains
    vit_block = attn + (D * M + M) + (M * D + D)          # + MLP; LayerNorms have no parameters
    dit_block = vit_block + (D * 6 * D + 6 * D)           # + adaLN modulation
    encoder = 12 * vit_block + (P * D + D) + L * D + (D * C + C)  # blocks, patch embed, levels, bottleneck
    decoder = 12 * dit_block + (C * D + D) + L * D + (D * P + P)  # blocks, in_proj, levels, head
    with torch.device("meta"):                             # no memory, no init cost
        model = HierarchicalAutoencoder(ae_config("paper"))
    assert num_params(model.encoder) == encoder == 85_637_408
    assert num_params(model.decoder) == decoder == 128_160_768
    # the paper's figures: 85.6 M + 128.2 M = 213.8 M
    assert abs(num_params(model.encoder) / 85.6e6 - 1) < 0.01
    assert abs(num_params(model.decoder) / 128.2e6 - 1) < 0.01
    assert abs(num_params(model) / 213.8e6 - 1) < 0.01
    assert model.grids == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.tokens_per_level == [256, 64, 16, 4]      # 340 tokens per frame


def test_toy_and_tiny_token_counts():
    toy = HierarchicalAutoencoder(ae_config("toy"))
    assert toy.grids == [(8, 8), (4, 4), (2, 2), (1, 1)]
    z = toy.encode(frames(1, 64))
    assert [tuple(t.shape) for t in z] == [(1, 64, 16), (1, 16, 16), (1, 4, 16), (1, 1, 16)]
    tiny = HierarchicalAutoencoder(ae_config("tiny"))
    assert [tuple(t.shape) for t in tiny.encode(frames(2, 32))] == [(2, 16, 8), (2, 4, 8), (2, 1, 8)]


# ----------------------------------------------------------------------------- pyramid, patches, positions

def test_pyramid_is_repeated_box_filter():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 3, 1, 1)
    x[:, 1] *= 2
    p = box_pyramid(x, 3)
    # hand means of each 2×2 block of [[0..3], [4..7], [8..11], [12..15]]
    level1 = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    assert torch.equal(p[0], x)
    assert torch.allclose(p[1][0, 0], level1) and torch.allclose(p[1][0, 1], 2 * level1)
    assert torch.allclose(p[2][0, 0], torch.tensor([[7.5]])) and torch.allclose(p[2][0, 2], torch.tensor([[7.5]]))


def test_patchify_order_and_inverse():
    img = torch.arange(3 * 4 * 4.0).reshape(1, 3, 4, 4)   # value = 16·c + 4·row + col
    tokens = patchify(img, 2)
    assert tokens.shape == (1, 4, 12)
    # token 1 = the patch at grid (row 0, col 1), flattened (channel, row, col)
    expected = [16 * c + 4 * r + 2 + q for c in range(3) for r in range(2) for q in range(2)]
    assert tokens[0, 1].tolist() == expected
    assert torch.equal(unpatchify(tokens, 2, 2, 2), img)


def test_positions_in_own_level_grid():
    D = 16
    pos, level = pyramid_layout([(4, 4), (2, 2), (1, 1)], D)
    assert pos.shape == (21, D) and level.tolist() == [0] * 16 + [1] * 4 + [2]
    # (row, col) = (0, 0): sin 0 = 0 and cos 0 = 1 in both halves
    assert pos[0].tolist() == ([0.0] * 4 + [1.0] * 4) * 2
    # level-1 token (row 1, col 0) has the same position as level-0 (row 1, col 0): no rescaling
    assert torch.equal(pos[16 + 2], pos[4])
    # the authors' table: columns first, then rows; frequencies ω_i = 10000^(-i/3) = 1, 0.0464, 0.00215, 1e-4
    # (from 1 down to exactly 1e-4). Row 1, column 0: [0…, 1…] then [sin 1, sin 0.0464, …, cos 1, …]
    assert pos[4, :8].tolist() == [0.0] * 4 + [1.0] * 4
    assert pos[4, 8].item() == pytest.approx(0.8414710) and pos[4, 9].item() == pytest.approx(0.0463992)
    assert pos[4, 11].item() == pytest.approx(1e-4) and pos[4, 12].item() == pytest.approx(0.5403023)
    assert pos[1, 0].item() == pytest.approx(0.8414710)  # row 0, column 1


# ----------------------------------------------------------------------------- encoder

def test_tanh_bound(tiny):
    z = tiny.encode(frames(2, 32))
    assert all(t.abs().max() <= 1 for t in z)
    big = HierarchicalAutoencoder(ae_config("tiny"))
    with torch.no_grad():
        big.encoder.bottleneck.weight.mul_(1e3)            # drive the pre-activations far out
    z = big.encode(frames(2, 32))
    assert max(t.abs().max().item() for t in z) == 1.0     # saturated, never beyond


def test_latents_are_float32_under_bf16_autocast(tiny):
    # the bottleneck leaves autocast: stored latents keep fp32 precision, not bf16's 2^-8 steps
    x = frames(2, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        z = tiny.encode(x)
    with torch.no_grad():
        reference = tiny.encode(x)
    assert all(t.dtype == torch.float32 for t in z)
    # control: autocast did run the transformer in bf16 (the latents differ a little from fp32's)
    assert 0 < max((a - b).abs().max().item() for a, b in zip(z, reference)) < 0.1


def test_cascaded_latents_are_detached_mean_pools():
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(ae_config("tiny", variant="cascaded"))
    z = model.encode(frames(2, 32))
    grid = z[0].reshape(2, 4, 4, 8)                        # (B, h, w, C)
    hand1 = torch.stack([(grid[:, 2 * r, 2 * c] + grid[:, 2 * r, 2 * c + 1] + grid[:, 2 * r + 1, 2 * c]
                          + grid[:, 2 * r + 1, 2 * c + 1]) / 4 for r in range(2) for c in range(2)], dim=1)
    assert torch.allclose(z[1], hand1, atol=1e-6)
    assert torch.allclose(z[2][:, 0], z[0].mean(dim=1), atol=1e-6)
    assert z[0].requires_grad and not z[1].requires_grad and not z[2].requires_grad
    # the coarse latents carry no gradient back to the encoder; the learned hierarchy's do
    hier = HierarchicalAutoencoder(ae_config("tiny")).encode(frames(2, 32))
    assert hier[1].requires_grad and not torch.allclose(hier[1], mean_pool_tokens(hier[0], 4, 4))


# ----------------------------------------------------------------------------- decoder

def test_non_kept_levels_zeroed_but_kept_in_sequence(tiny):
    z = tiny.encode(frames(3, 32))
    seen = []
    hook = tiny.decoder.in_proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    tiny.decode(z, torch.tensor([0, 2, 1]))                # a different kept level per sample
    hook.remove()
    (inp,) = seen
    assert inp.shape == (3, 21, 8)                         # all 16 + 4 + 1 tokens still in the sequence
    spans = {0: slice(0, 16), 1: slice(16, 20), 2: slice(20, 21)}
    for b, kept in enumerate([0, 2, 1]):
        for l, span in spans.items():
            expected = z[l][b] if l == kept else torch.zeros_like(z[l][b])
            assert torch.equal(inp[b, span], expected)


def test_decoder_outputs_whole_pyramid_and_per_sample_levels(tiny):
    x = frames(3, 32)
    z = tiny.encode(x)
    with torch.no_grad():
        out = tiny.decode(z, torch.tensor([2, 0, 1]))
        assert [tuple(o.shape) for o in out] == [(3, 3, 32, 32), (3, 3, 16, 16), (3, 3, 8, 8)]
        for b, kept in enumerate([2, 0, 1]):
            alone = tiny.decode([t[b:b + 1] for t in z], kept)
            assert all(torch.allclose(o[b:b + 1], a, atol=1e-5) for o, a in zip(out, alone))
        # None entries are zeros: decoding from level 0 needs only level 0's tokens
        only0 = tiny.decode([z[0], None, None], 0)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(only0, tiny.decode(z, 0)))
        # the kept level matters: the same latents decoded from another level differ
        assert not torch.allclose(tiny.decode(z, 1)[0], out[0][1:2].expand(3, -1, -1, -1))
    with pytest.raises(ValueError, match="level 3"):
        tiny.decode(z, 3)
    with pytest.raises(ValueError, match="expected \\(B, 3, 32, 32\\)"):
        tiny.encode(frames(1, 64))


def test_adaln_zero_blocks_start_as_identity():
    model = HierarchicalAutoencoder(ae_config("tiny"))
    h, c = torch.randn(2, 21, 64), torch.randn(2, 64)
    for block in model.decoder.blocks:
        assert torch.equal(block(h, c), h)
        assert block.adaLN_modulation[-1].weight.abs().sum() == 0


# ----------------------------------------------------------------------------- loss

def test_level_weights_make_every_level_count_equally():
    target = box_pyramid(torch.zeros(1, 3, 32, 32), 3)     # 32², 16², 8²: 1024 + 256 + 64 = 1344 pixels
    delta = 0.3
    losses = []
    for l in range(3):
        pred = [t + (delta if k == l else 0.0) for k, t in enumerate(target)]
        loss, mse = pyramid_mse(pred, target)
        assert mse[l].item() == pytest.approx(delta ** 2)
        losses.append(loss.item())
    # (T_0 / T)·δ² whichever level carries the error: 1024/1344 = 16/21
    assert losses == pytest.approx([16 / 21 * delta ** 2] * 3)
    # the same as the literal definition: per-token MSE × 4^l, mean over all 21 tokens
    pred = [torch.rand_like(t) for t in target]
    per_token = torch.cat([patchify(p - t, 8).pow(2).mean(-1) * 4 ** l
                           for l, (p, t) in enumerate(zip(pred, target))], dim=1)  # (1, 21)
    assert pyramid_mse(pred, target)[0].item() == pytest.approx(per_token.mean().item(), rel=1e-6)


def test_loss_stats_and_training_reduces_loss():
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(ae_config("tiny"))
    x = frames(4, 32)
    loss, stats = model(x, level=torch.tensor([0, 1, 2, 0]))
    assert set(stats) == {"mse0", "mse1", "mse2", "loss"}  # lpips_weight 0: no perceptual term
    # detached 0-dim tensors: nothing waits for the device until the training loop logs them
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    stats = {k: float(v) for k, v in stats.items()}
    assert stats["loss"] == pytest.approx(16 / 21 * (stats["mse0"] + stats["mse1"] + stats["mse2"]), rel=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss, stats = model.loss(x, generator=torch.Generator().manual_seed(1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(stats["loss"]) < 0.3 * first              # measured: 2.4 → 0.16


def test_lpips_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))        # an empty hub cache
    with pytest.raises(FileNotFoundError) as err:
        HierarchicalAutoencoder(ae_config("tiny")).load_lpips()
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "--lpips_weight=0" in message
    model = HierarchicalAutoencoder(ae_config("tiny", lpips_weight=0.05))  # building needs no weights
    with pytest.raises(FileNotFoundError, match="vgg16"):
        model.loss(frames(1, 32))


def test_lpips_term_frozen_and_out_of_state_dict():
    import lpips
    torch.manual_seed(0)
    model = HierarchicalAutoencoder(ae_config("tiny", lpips_weight=0.5))
    keys, count = set(model.state_dict()), num_params(model)
    # random VGG backbone (no download); lpips' own linear heads ship with the package
    net = model.load_lpips(lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False))
    model.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert set(model.state_dict()) == keys and num_params(model) == count
    x, level = frames(2, 32), torch.tensor([0, 2])
    loss, stats = model.loss(x, level)
    with torch.no_grad():
        pred = model.decode(model.encode(x), level)
        perceptual = net(pred[0], x, normalize=True).mean()
        expected = pyramid_mse(pred, box_pyramid(x, 3))[0] + 0.5 * perceptual
    assert float(stats["lpips"]) == pytest.approx(perceptual.item(), rel=1e-5) and perceptual > 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()                                        # the perceptual term reaches the decoder
    assert model.decoder.head.weight.grad.abs().sum() > 0


def test_levels_command_scores_each_level_and_writes_the_figure(tmp_path, capsys):
    """`python tokenizer.py levels`: a PSNR per decoded level that matches a direct computation, and the
    Fig. 5-style image with one row per checkpoint (ground truth + every level)."""
    import data
    import train
    frames = str(tmp_path / "frames")
    data.make_maze(frames, data.maze_config("tiny", videos=2, workers=1), "train")
    cfg = ae_config("tiny", steps=2, batch_size=4)
    run = train.RunConfig(out=str(tmp_path / "ae"), data=frames, workers=0, holdout=0.5, log_every=10**6,
                          image_every=10**6)
    model = train.train("ae", cfg, run, "tiny")
    image = str(tmp_path / "levels.png")
    main(["levels", str(tmp_path / "ae"), str(tmp_path / "ae"), "--data", frames, "--frames", "8", "--image", image,
          "--show", "2"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    x = torch.from_numpy(data.read_frames(frames, "000/000", 0, 1)).permute(0, 3, 1, 2).float() / 255
    psnr, images = level_psnr(model.eval(), x)
    assert len(psnr) == 3 and "L2" in printed
    direct = -10 * torch.log10((images[2] - x).square().mean()).item()
    assert abs(psnr[2] - direct) < 1e-6
    from PIL import Image
    # (1 + levels) columns, 2 rows per checkpoint, 32-pixel frames enlarged 4x, a 14-pixel caption bar
    assert Image.open(image).size == (4 * 32 * 4, 4 * 32 * 4 + 14)


def test_checkpoints_load_themselves_and_old_formats_are_refused(tiny, tmp_path):
    """from_checkpoint rebuilds the model from the config stored beside its weights; a checkpoint written
    by an older version (no format number: the first version's layout) or of another stage fails with a
    message naming the file instead of being misread."""
    import dataclasses
    from tokenizer import CHECKPOINT_FORMAT, read_checkpoint
    model = tiny
    config = {"stage": "ae", "format": CHECKPOINT_FORMAT, "model": dataclasses.asdict(model.cfg)}
    torch.save({"model": model.state_dict(), "config": config}, tmp_path / "ckpt-00000001.pt")
    loaded = HierarchicalAutoencoder.from_checkpoint(str(tmp_path))  # a run folder: its newest checkpoint
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert not loaded.training and loaded.cfg == model.cfg
    old = {k: v for k, v in config.items() if k != "format"}
    torch.save({"model": model.state_dict(), "config": old}, tmp_path / "ckpt-00000002.pt")
    with pytest.raises(ValueError, match=rf"ckpt-00000002.pt: .*format 1.*expected stage 'ae', format {CHECKPOINT_FORMAT}"):
        HierarchicalAutoencoder.from_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="expected stage 'video'"):
        read_checkpoint(str(tmp_path / "ckpt-00000001.pt"), "video")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        HierarchicalAutoencoder.from_checkpoint(str(tmp_path / "nothing-here"))
