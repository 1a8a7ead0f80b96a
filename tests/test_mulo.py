"""MuLo-SD on the one cached loop: exactly the union of neighbourhoods is redrawn, islands are batched,
and the cached loop gives the cache-free reference loop's tokens (tests/mulo_reference.py) for the
same seed."""

import pytest
import torch

from mmspec import SamplingParams
from mmspec.image_gen.locality import expand_rejections
from mmspec.image_gen.mulo import local_resample_set
from mulo_reference import GuidedContext, ReferenceMultiScaleDrafter, decode_mulo, guided_logits, resample_islands, row_drafter
from mmspec.rng import keyed_exponential, keyed_uniform
from mmspec.verify.rule import AcceptRule
from mmspec.verify.types import Judgement
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


class _RejectAt(AcceptRule):
    """Rejects exactly the block offsets in ``offsets``."""

    def __init__(self, offsets):
        self.offsets = offsets

    def judge(self, draft_tokens, draft_probs, target_probs, uniforms):
        acc = torch.ones_like(draft_tokens, dtype=torch.bool)
        acc[:, self.offsets] = False
        return Judgement(accepted=acc, residual=None)


def _repair_once(ctx, grid, t0, rejected_offsets, sampling, parallel):
    """One verification forward over [prefix, grid[:t0 + 24]] on a cached CFG session, then the library's
    island resampling of the block [t0, t0 + 24) with ``rejected_offsets`` rejected."""
    from mmspec.guidance import Guidance, open_session
    from mmspec.image_gen.mulo import LocalResampling
    from mmspec.rng import RowRandom

    model, m = ctx.model, 24
    ids = torch.tensor([ctx.cond])
    session = open_session(model, ids, torch.ones_like(ids), guidance=Guidance(
        uncond=[ctx.uncond], scale=ctx.cfg_scale, schedule="constant", num_tokens=36))
    flat = grid.flatten()
    if t0:
        session.extend(torch.cat([ids[:, -1:], flat[None, : t0 - 1]], dim=1))
    logits = session.extend(torch.cat([flat[None, t0 - 1: t0] if t0 else ids[:, -1:], flat[None, t0:t0 + m]], 1))
    repair = LocalResampling(_RejectAt(rejected_offsets), 6, 1, sampling, parallel=parallel)
    calls = session.inner.calls
    final, kept = repair(session, flat[None, t0:t0 + m], logits[:, :m], torch.tensor([t0]),
                         RowRandom.from_seed([7], 1, None), last=None)
    return final[0], kept[0], session.inner.calls - calls


def test_exactly_the_neighbourhoods_are_resampled_and_islands_batch_like_one_by_one():
    """The cached island resampling redraws exactly the union of neighbourhoods, gives the cache-free
    reference's tokens, and batching the islands gives the same tokens as one island after another in
    fewer forwards."""
    ctx = context()
    g = torch.Generator().manual_seed(1)
    grid = torch.randint(0, 16, (6, 6), generator=g)
    t0 = 12  # block = rows 2..5
    rejected = torch.zeros(6, 6, dtype=torch.bool)
    rejected[2, 1] = rejected[4, 5] = rejected[5, 0] = True  # three rejections -> islands
    resample = local_resample_set(rejected, 1, t0)
    assert torch.equal(resample, expand_rejections(rejected, 1, t0))
    offsets = [int(i) - t0 for i in torch.nonzero(rejected.flatten()).flatten()]
    for sampling in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)):
        ref = resample_islands(ctx, grid, resample, t0, 36, sampling, seed=7)
        assert int(ref.islands.max()) + 1 == 2  # (2,1) and (5,0) touch diagonally after expansion
        par, kept, par_calls = _repair_once(ctx, grid, t0, offsets, sampling, parallel=True)
        one, _, one_calls = _repair_once(ctx, grid, t0, offsets, sampling, parallel=False)
        assert torch.equal(par, one) and par_calls < one_calls  # islands share forwards when batched
        assert torch.equal(par, ref.tokens.flatten()[t0:])
        assert torch.equal(kept, ~resample.flatten()[t0:])
        assert torch.equal(par[kept], grid.flatten()[t0:][kept])  # every other token kept
    assert (par != grid.flatten()[t0:])[~kept].any()


def test_keyed_noise_depends_only_on_the_key():
    a = keyed_exponential(5, torch.tensor([3, 9]), 8)
    b = keyed_exponential(5, torch.tensor([9]), 8)
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])
    u = keyed_uniform(5, torch.arange(20000), 1).flatten()
    assert 0.49 < u.mean().item() < 0.51 and u.min() >= 0 and u.max() < 1


def test_mulo_loop_extremes():
    """tau = 0 keeps every candidate (output = the drafts); tau > 1 rejects everything, so every block
    is one island redrawn in raster order: greedy output = plain AR greedy of the target."""
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
                          rows_per_step=2, l=0, sampling=SamplingParams(temperature=1.0), seed=0)
    # l = 0: exactly the rejected tokens are redrawn and the accepted ones kept; both kinds occur
    assert 0 < st.accepted < 36 and st.resampled == 36 - st.accepted and int(st.kept_map.sum()) == st.accepted


def _mulo_pair(dtype=torch.float64):
    from mmspec.image_gen import tiny_vq_tokenizer

    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)  # 8 x 8 grid
    if dtype == torch.float64:
        tok = type(tok)(tok.vq_model.double(), 32)
    return tok, tiny_ar(grid=8, codebook=16, dtype=dtype), tiny_ar(grid=4, codebook=16, seed=3, dtype=dtype)


def test_multiscale_drafter_mechanics():
    """Scale 2: one low-res row drafted per step becomes two high-res rows; at tau = 0 the cached loop
    outputs exactly the up-sampled drafts, every token kept."""
    import mmspec.image_gen as ig
    from mmspec.image_gen.multiscale import MultiScaleDrafter

    tok, hi, lo = _mulo_pair()
    drafter = MultiScaleDrafter(lo, tok, 2)
    assert drafter.resampler.downsample(torch.zeros(1, 8, 8, dtype=torch.long)).shape == (1, 4, 4)
    assert drafter.resampler.upsample(torch.zeros(1, 4, 4, dtype=torch.long)).shape == (1, 8, 8)
    events = list(ig.generate_stream(hi, tok, condition=[2], method="mulo", drafter=lo, mulo_tau=0.0, cfg_scale=2.0,
                                     temperature=0.0))
    assert len(events) == 4 and all(ev.num_draft == [16] and ev.num_accepted == [16] for ev in events)
    assert all(all(ev.kept[0]) for ev in events)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("tau", [0.2, 0.5])
def test_cached_loop_gives_the_reference_loops_tokens(temperature, tau):
    """The same seed gives the cache-free reference's tokens, alone or inside a batch of images."""
    import mmspec.image_gen as ig
    from mmspec.image_gen.neighbours import build_latent_neighbours
    from mmspec.verify import PooledThresholdRule

    tok, hi, lo = _mulo_pair()
    sampling = SamplingParams(temperature=temperature)
    table = build_latent_neighbours(tok.codebook, 4)
    seeds = {1: 11, 2: 12, 7: 17, 5: 15}  # image 5 among three others, and alone
    expected, kept = {}, {}
    for c, seed in seeds.items():
        ctx = GuidedContext(hi, hi.prefix_ids(c), hi.prefix_ids(c, unconditional=True), 2.0)
        lctx = GuidedContext(lo, lo.prefix_ids(c), lo.prefix_ids(c, unconditional=True), 2.0)
        toks, st = decode_mulo(ctx, ReferenceMultiScaleDrafter(lctx, tok, 2, sampling, seed),
                               PooledThresholdRule(table, tau), grid=8, rows_per_step=2, l=1, sampling=sampling,
                               seed=seed)
        expected[c], kept[c] = toks, st.kept_map
    out = ig.generate(hi, tok, condition=list(seeds), method="mulo", drafter=lo, neighbours=table, mulo_tau=tau,
                      mulo_redraw="local", cfg_scale=2.0, temperature=temperature, seed=list(seeds.values()))
    for i, c in enumerate(seeds):
        assert torch.equal(out.tokens[i], expected[c]), c
    assert torch.allclose(out.stats.accepted_map, torch.stack([kept[c].float() for c in seeds]).mean(0))
    if tau == 0.2:
        assert 0 < float(out.stats.accepted_map.mean()) < 1  # both kept and redrawn tokens occur
    alone = ig.generate(hi, tok, condition=[5], method="mulo", drafter=lo, neighbours=table, mulo_tau=tau,
                        mulo_redraw="local", cfg_scale=2.0, temperature=temperature, seed=[15])
    assert torch.equal(alone.tokens[0], expected[5])
    reverse = ig.generate(hi, tok, condition=list(seeds)[::-1], method="mulo", drafter=lo, neighbours=table,
                          mulo_tau=tau, mulo_redraw="local", cfg_scale=2.0, temperature=temperature,
                          seed=list(seeds.values())[::-1])
    assert torch.equal(reverse.tokens[0], expected[5])


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


def test_cached_loop_with_a_learned_resampler_gives_the_reference_tokens():
    """A token-space resampler plugs into both loops; the cached loop still gives the reference's tokens."""
    import mmspec.image_gen as ig
    from mmspec.image_gen.neighbours import build_latent_neighbours
    from mmspec.image_gen.token_resampler import TokenResampler, TokenResamplerConfig
    from mmspec.verify import PooledThresholdRule

    tok, hi, lo = _mulo_pair()
    torch.manual_seed(5)
    res = TokenResampler(TokenResamplerConfig(vocab_size=16, scale=2, width=16, depth=2)).eval()
    sampling = SamplingParams(temperature=1.0)
    table = build_latent_neighbours(tok.codebook, 4)
    c, seed = 3, 23
    ctx = GuidedContext(hi, hi.prefix_ids(c), hi.prefix_ids(c, unconditional=True), 2.0)
    lctx = GuidedContext(lo, lo.prefix_ids(c), lo.prefix_ids(c, unconditional=True), 2.0)
    expected, _ = decode_mulo(ctx, ReferenceMultiScaleDrafter(lctx, tok, 2, sampling, seed, resampler=res),
                              PooledThresholdRule(table, 0.2), grid=8, rows_per_step=2, l=1, sampling=sampling,
                              seed=seed)
    out = ig.generate(hi, tok, condition=[c, 1], method="mulo", drafter=lo, neighbours=table, mulo_tau=0.2,
                      mulo_redraw="local", mulo_resampler=res, cfg_scale=2.0, temperature=1.0, seed=[seed, 4])
    assert torch.equal(out.tokens[0], expected)
    from mmspec.errors import MethodParameterError
    with pytest.raises(MethodParameterError, match="mulo_resampler must have upsample/downsample"):
        ig.generate(hi, tok, condition=[c], method="mulo", drafter=lo, mulo_resampler="pixels")


def _first_rows(method_kwargs, n, seed0):
    """Tokens of the first 16 positions (two rows, the first block and the start of the second) of ``n`` images
    of class 2, seeds seed0 ... (tiny pair, CFG 2, T = 1)."""
    import mmspec.image_gen as ig

    tok, hi, lo = _mulo_pair(torch.float32)
    out = ig.generate(hi, tok, condition=[2] * n, cfg_scale=2.0, temperature=1.0, seed=list(range(seed0, seed0 + n)),
                      **({"drafter": lo} if method_kwargs["method"] == "mulo" else {}), **method_kwargs)
    return out.tokens.flatten(1)[:, :16]


def _positionwise_p(a, b):
    """Two-sample chi-square over every position's token histogram (statistics and dofs summed)."""
    from scipy.stats import chi2, chi2_contingency

    stat, dof = 0.0, 0
    for j in range(a.shape[1]):
        ca, cb = torch.bincount(a[:, j], minlength=16), torch.bincount(b[:, j], minlength=16)
        keep = (ca + cb) > 0
        if int(keep.sum()) < 2:
            continue
        r = chi2_contingency(torch.stack([ca[keep], cb[keep]]).numpy(), correction=False)
        stat, dof = stat + float(r.statistic), dof + int(r.dof)
    return float(chi2.sf(stat, dof))


def test_bounded_mulo_at_delta_0_with_chain_redraws_samples_the_target():
    """mulo_delta = 0 with mulo_redraw "rest" (the defaults) is the chain rule: per position, its images' token
    distribution equals plain AR's (two-sample test); the paper's test keeping every draft (tau = 0) fails the same
    test (negative control), and so does the relaxed delta = 0.3 (the test sees a bounded shift); greedy output equals
    plain AR greedy token for token."""
    import mmspec.image_gen as ig

    n = 200
    ar = _first_rows(dict(method="ar"), n, 0)
    mulo = _first_rows(dict(method="mulo"), n, 10_000)
    assert _positionwise_p(ar, mulo) > 1e-3
    keep_all = _first_rows(dict(method="mulo", mulo_tau=0.0, mulo_redraw="local"), n, 10_000)
    assert _positionwise_p(ar, keep_all) < 1e-6
    assert _positionwise_p(ar, _first_rows(dict(method="mulo", mulo_delta=0.3), n, 10_000)) < 1e-6
    tok, hi, lo = _mulo_pair(torch.float32)
    greedy = dict(condition=[1, 2, 3], cfg_scale=2.0, temperature=0.0)
    assert torch.equal(ig.generate(hi, tok, method="mulo", drafter=lo, **greedy).tokens,
                       ig.generate(hi, tok, method="ar", **greedy).tokens)


def test_mulo_rejects_tau_with_delta_and_unknown_redraw():
    import mmspec.image_gen as ig
    from mmspec.errors import MethodParameterError

    tok, hi, lo = _mulo_pair(torch.float32)
    with pytest.raises(MethodParameterError, match="give mulo_delta .* or mulo_tau .*, not both"):
        ig.generate(hi, tok, condition=[1], method="mulo", drafter=lo, mulo_tau=0.9, mulo_delta=0.1)
    with pytest.raises(MethodParameterError, match="mulo_redraw must be one of \\('local', 'rest'\\)"):
        ig.generate(hi, tok, condition=[1], method="mulo", drafter=lo, mulo_redraw="all")
    with pytest.raises(MethodParameterError, match="mulo_delta must be in \\[0.0, 1.0\\]"):
        ig.generate(hi, tok, condition=[1], method="mulo", drafter=lo, mulo_delta=1.5)
