"""MuLo-SD local resampling: exactly the union of neighbourhoods is redrawn, islands are batched."""

import torch

from mmspec import SamplingParams
from mmspec.image_gen.locality import expand_rejections
from mmspec.image_gen.mulo import GuidedContext, guided_logits, local_resample_set, resample_islands
from mmspec.rng import keyed_exponential, keyed_uniform
from tiny_image_models import reference_logits, tiny_ar


def context(cfg=2.0):
    model = tiny_ar(grid=6, codebook=16, init=0.5)
    return GuidedContext(model, model.prefix_ids(3), model.prefix_ids(3, unconditional=True) if cfg != 1 else None, cfg)


def test_guided_logits_equal_reference_when_everything_is_visible():
    ctx = context()
    toks = torch.randint(0, 16, (1, 36), generator=torch.Generator().manual_seed(0))
    got = guided_logits(ctx, toks, torch.ones_like(toks, dtype=torch.bool))
    for j in (0, 5, 17, 35):
        ref = reference_logits(ctx.model, 3, toks[0, :j].tolist(), 2.0)
        assert torch.allclose(got[0, j], ref, atol=1e-9)


def test_exactly_the_neighbourhoods_are_resampled_and_islands_batch_like_one_by_one():
    ctx = context()
    g = torch.Generator().manual_seed(1)
    grid = torch.randint(0, 16, (6, 6), generator=g)
    rejected = torch.zeros(6, 6, dtype=torch.bool)
    rejected[2, 1] = rejected[4, 5] = rejected[5, 0] = True  # three rejections -> islands
    t0 = 12  # block = rows 2..5
    resample = local_resample_set(rejected, 1, t0)
    assert torch.equal(resample, expand_rejections(rejected, 1, t0))
    for sampling in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)):
        batched = resample_islands(ctx, grid, resample, sampling, seed=7, batched=True)
        single = resample_islands(ctx, grid, resample, sampling, seed=7, batched=False)
        assert torch.equal(batched.tokens, single.tokens)
        assert torch.equal(batched.tokens[~resample], grid[~resample])  # every other token kept
        assert int(batched.islands.max()) + 1 == 2  # (2,1) and (5,0) touch diagonally after expansion
        assert batched.forwards < single.forwards  # islands share forwards when batched
    changed = (batched.tokens != grid) & resample
    assert changed.any()


def test_keyed_noise_depends_only_on_the_key():
    a = keyed_exponential(5, torch.tensor([3, 9]), 8)
    b = keyed_exponential(5, torch.tensor([9]), 8)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    u = keyed_uniform(5, torch.arange(20000), 1).flatten()
    assert 0.49 < u.mean().item() < 0.51 and u.min() >= 0 and u.max() < 1


def test_mulo_loop_extremes():
    """tau = 0 keeps every candidate (output = the drafts); tau > 1 rejects everything, so every block
    is one island redrawn in raster order: greedy output = plain AR greedy of the target."""
    from mmspec.image_gen.mulo import decode_mulo, row_drafter
    from mmspec.image_gen.neighbours import build_latent_neighbours
    from mmspec.verify import PooledThresholdRule
    from tiny_image_models import reference_greedy, truncated_ar

    ctx = context()
    table = build_latent_neighbours(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), 2)
    greedy = SamplingParams(temperature=0.0)
    dctx = GuidedContext(truncated_ar(ctx.model), ctx.cond, ctx.uncond, ctx.cfg_scale)
    drafts = []

    def recording(prefix, t0, m):
        out = row_drafter(dctx, greedy, 0)(prefix, t0, m)
        drafts.append(out)
        return out

    keep_all, st = decode_mulo(ctx, recording, PooledThresholdRule(table, 0.0), grid=6, rows_per_step=2, l=1,
                               sampling=greedy, seed=0)
    assert torch.equal(keep_all.flatten(), torch.cat(drafts)) and st.resampled == 0 and st.target_forwards == 3
    reject_all, st = decode_mulo(ctx, row_drafter(dctx, greedy, 0), PooledThresholdRule(table, 1.5), grid=6,
                                 rows_per_step=2, l=1, sampling=greedy, seed=0)
    assert reject_all.flatten().tolist() == list(reference_greedy(ctx.model, 3, 2.0))
    assert st.resampled == 36 and st.accepted == 0
    mid, st = decode_mulo(ctx, row_drafter(dctx, SamplingParams(1.0), 0), PooledThresholdRule(table, 0.3), grid=6,
                          rows_per_step=2, l=1, sampling=SamplingParams(temperature=1.0), seed=0)
    assert mid.shape == (6, 6) and 0 <= st.resampled <= 36


def test_multiscale_drafter_mechanics():
    """Scale 2: one low-res row drafted per step becomes two high-res rows; the decode loop runs end to end
    and, at tau = 0, outputs exactly the up-sampled drafts."""
    from mmspec.image_gen import tiny_vq_tokenizer
    from mmspec.image_gen.multiscale import MultiScaleDrafter
    from mmspec.image_gen.mulo import decode_mulo
    from mmspec.image_gen.neighbours import build_latent_neighbours
    from mmspec.verify import PooledThresholdRule

    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)  # 8 x 8 grid
    tok = type(tok)(tok.vq_model.double(), 32)
    hi = tiny_ar(grid=8, codebook=16)
    lo = tiny_ar(grid=4, codebook=16, seed=3)
    ctx = GuidedContext(hi, hi.prefix_ids(2), hi.prefix_ids(2, unconditional=True), 2.0)
    lctx = GuidedContext(lo, lo.prefix_ids(2), lo.prefix_ids(2, unconditional=True), 2.0)
    greedy = SamplingParams(temperature=0.0)
    drafter = MultiScaleDrafter(lctx, tok, 2, greedy)
    assert drafter.downsample(torch.zeros(8, 8, dtype=torch.long)).shape == (4, 4)
    assert drafter.upsample(torch.zeros(4, 4, dtype=torch.long)).shape == (8, 8)
    seen = []
    rec = lambda prefix, t0, m: seen.append(drafter(prefix, t0, m)) or seen[-1]
    table = build_latent_neighbours(tok.codebook, 2)
    out, st = decode_mulo(ctx, rec, PooledThresholdRule(table, 0.0), grid=8, rows_per_step=2, l=1,
                          sampling=greedy, seed=0)
    assert torch.equal(out.flatten(), torch.cat(seen)) and st.steps == 4 and st.verify_forwards == 4


def test_generate_method_mulo():
    import mmspec.image_gen as ig
    from mmspec.image_gen import tiny_vq_tokenizer

    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)
    hi = tiny_ar(grid=8, codebook=16, dtype=torch.float32)
    lo = tiny_ar(grid=4, codebook=16, seed=3, dtype=torch.float32)
    out = ig.generate(hi, tok, condition=[1, 2], drafter=lo, method="mulo", cfg_scale=2.0, mulo_tau=0.2,
                      generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 8, 8) and len(out.images) == 2
    assert out.stats.accepted_map.shape == (8, 8) and out.stats.target_forwards_per_image >= 4
    # tau > 1 rejects everything: greedy output equals plain AR greedy of the target
    ar = ig.generate(hi, condition=[1], method="ar", cfg_scale=2.0, temperature=0.0)
    rej = ig.generate(hi, tok, condition=[1], drafter=lo, method="mulo", cfg_scale=2.0, temperature=0.0, mulo_tau=2.0)
    assert torch.equal(ar.tokens, rej.tokens)
    import pytest
    with pytest.raises(ig.MethodError, match="needs a drafter model \\(a low-resolution AR image model\\)"):
        ig.generate(hi, condition=[1], method="mulo")
    with pytest.raises(ig.MethodError, match="mulo_scale=4 but the drafter's grid 4 is 1/2"):
        ig.generate(hi, tok, condition=[1], drafter=lo, method="mulo", mulo_scale=4)


def test_script_mulo(tmp_path):
    from mmspec.cli import main
    from mmspec.image_gen import tiny_vq_tokenizer
    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)
    tok.save_pretrained(tmp_path / "tok")
    tiny_ar(grid=8, codebook=16, dtype=torch.float32).save_pretrained(tmp_path / "hi")
    tiny_ar(grid=4, codebook=16, seed=3, dtype=torch.float32).save_pretrained(tmp_path / "lo")
    rc = main(["imagegen", "--model", str(tmp_path / "hi"), "--tokenizer", str(tmp_path / "tok"), "--drafter",
               str(tmp_path / "lo"), "--class", "1", "--method", "mulo", "--mulo-tau", "0.2", "--mulo-scale", "2", "--out",
               str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "acceptance_heatmap.png").exists()
