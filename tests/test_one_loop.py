"""The one loop across modalities: per-row randomness (a row's sampled output depends only on its own
prompt and seed: alone, or inside a batch of other prompts in either order) for text, VLM and image
generation; draft trees for VLM and image drafters; eager prompt validation."""

import functools

import pytest
import torch

import mmspec
import mmspec.image_gen as ig
import mmspec.vision as mv
from mmspec.drafters.tree import DynamicTree, StaticTree
from tiny_image_models import reference_greedy, tiny_ar, truncated_ar
from tiny_models import build, left_padded_prompts, truncated_drafter
from tiny_vlms import build_vlm, truncated_vlm_drafter, vlm_inputs


@functools.lru_cache(maxsize=None)
def text_models():
    target = build("llama")
    return target, truncated_drafter(target)


def _rows(out, n):
    return [out.sequences[b, -n:].tolist() for b in range(out.sequences.shape[0])]


def _left_pad(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("drafter_kind", ["model", "tree", "prompt_lookup", "none"])
def test_text_row_depends_only_on_its_prompt_and_seed(drafter_kind):
    target, small = text_models()
    drafter = {"model": small, "tree": mmspec.TreeDrafter(small, StaticTree((2, 2))), "prompt_lookup": "prompt_lookup",
               "none": None}[drafter_kind]
    ids, _ = left_padded_prompts(4, 10, 96, seed=5)
    prompts = [ids[b, b:].tolist() for b in range(4)]  # four different lengths
    n = 20

    def run(order, seeds):
        x, m = _left_pad([prompts[i] for i in order])
        out = mmspec.generate(target, x, attention_mask=m, drafter=drafter, max_new_tokens=n, temperature=1.0,
                              num_draft_tokens=3, seed=seeds, eos_token_id=[])
        return _rows(out, n)

    alone = run([2], [77])[0]
    assert run([0, 2, 1, 3], [5, 77, 6, 7])[1] == alone
    assert run([3, 1, 0, 2], [7, 6, 5, 77])[3] == alone
    assert run([2], [78])[0] != alone  # the seed matters


def test_same_seed_reproduces_and_generator_still_works():
    target, small = text_models()
    ids, mask = left_padded_prompts(2, 8, 96, seed=1)
    kw = dict(attention_mask=mask, drafter=small, max_new_tokens=12, temperature=1.0, eos_token_id=[])
    a = mmspec.generate(target, ids, seed=3, **kw).sequences
    assert torch.equal(a, mmspec.generate(target, ids, seed=3, **kw).sequences)
    g1 = mmspec.generate(target, ids, generator=torch.Generator().manual_seed(9), **kw).sequences
    g2 = mmspec.generate(target, ids, generator=torch.Generator().manual_seed(9), **kw).sequences
    assert torch.equal(g1, g2)
    with pytest.raises(mmspec.InvalidSamplingError, match="one per row"):
        mmspec.generate(target, ids, seed=[1, 2, 3], **kw)


def test_vlm_row_depends_only_on_its_prompt_and_seed():
    target = build_vlm("llava", dtype=torch.float64)
    drafter = truncated_vlm_drafter(target)
    inputs = vlm_inputs("llava", 4, seed=4)  # four images / prompts
    n = 12

    def run(rows, seeds):
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[0] == 4 else v) for k, v in inputs.items()}
        out = mv.generate(target, drafter, sub, keep_ratio=0.5, pruning="uniform", max_new_tokens=n,
                          temperature=1.0, num_draft_tokens=2, seed=seeds, eos_token_id=[])
        return _rows(out, n)

    alone = run([1], [41])[0]
    assert run([0, 1, 2, 3], [1, 41, 2, 3])[1] == alone
    assert run([3, 2, 0, 1], [3, 2, 1, 41])[3] == alone


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("batch", [1, 2])
def test_vlm_trees_match_hf_generate(arch, batch):
    target = build_vlm(arch)
    drafter = truncated_vlm_drafter(target)
    inputs = vlm_inputs(arch, batch, seed=batch)
    expected = target.generate(**inputs, do_sample=False, max_new_tokens=16)
    for tree in (StaticTree((3, 2, 1)), DynamicTree(depth=4, top_k=3, num_nodes=8)):
        out = mv.generate(target, drafter, inputs, pruning="verifier", keep_ratio=0.25, max_new_tokens=16, tree=tree)
        assert torch.equal(out.sequences, expected)


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_image_trees_equal_the_reference_decoder(cfg):
    target = tiny_ar()
    conds = [3, 7, 0]
    expected = [list(reference_greedy(target, c, cfg, "linear")) for c in conds]
    for tree in (StaticTree((3, 2, 1)), DynamicTree(depth=4, top_k=3, num_nodes=8)):
        d = ig.ARDrafter(truncated_ar(target), tree=tree)
        out = ig.generate(target, condition=conds, method="exact", drafter=d, cfg_scale=cfg, cfg_schedule="linear",
                          temperature=0.0)
        assert out.tokens.view(3, -1).tolist() == expected


def test_image_trees_per_row_randomness():
    target = tiny_ar()
    d = ig.ARDrafter(truncated_ar(target), tree=StaticTree((2, 2)))
    run = lambda conds, seeds: ig.generate(target, condition=conds, method="exact", drafter=d, cfg_scale=2.0,
                                           temperature=1.0, seed=seeds).tokens
    alone = run([3], [5])[0]
    assert torch.equal(run([1, 3, 2], [8, 5, 9])[1], alone)


def test_prompt_ids_are_checked_eagerly():
    target, small = text_models()
    for bad in (96, -1):
        ids = torch.tensor([[5, 6, bad, 7]])
        with pytest.raises(mmspec.TokenIdError, match="outside the vocabulary \\[0, 96\\)"):
            mmspec.generate_stream(target, ids, drafter=small, max_new_tokens=4)  # before the first next()
    with pytest.raises(mmspec.TokenIdError):
        mmspec.generate(target, torch.tensor([[5, 6, 200]]), drafter="prompt_lookup", max_new_tokens=4)


class _HiddenRecorder(mmspec.ModelDrafter):
    """A model drafter that asks for two target layers and records what observe receives."""

    hidden_layers = (1, -1)

    def observe(self, outcome):
        self.seen.append(outcome)
        super().observe(outcome)


def test_drafters_get_the_target_hidden_states_they_ask_for_and_only_then():
    target, small = text_models()
    ids = torch.tensor([[5, 9, 17, 33, 40]])
    calls = []
    hook = target.register_forward_pre_hook(lambda m, a, kw: calls.append(bool(kw.get("output_hidden_states"))),
                                            with_kwargs=True)
    try:
        d = _HiddenRecorder(small)
        d.seen = []
        out = mmspec.generate(target, ids, drafter=d, max_new_tokens=8, num_draft_tokens=3, eos_token_id=[])
        assert all(calls)  # the prefill (hidden states over the prompt, for observe_prefill) and every verification
        calls.clear()
        mmspec.generate(target, ids, drafter=small, max_new_tokens=8, num_draft_tokens=3, eos_token_id=[])
        assert not any(calls)
    finally:
        hook.remove()
    full = target(out.sequences, output_hidden_states=True).hidden_states
    first = d.seen[0]
    assert sorted(first.target_hidden) == [-1, 1]
    k = first.draft.k
    assert first.target_hidden[1].shape == (1, k + 1, target.config.hidden_size)
    # the verification forward's column 0 is the last prompt token: its states equal the full forward's
    for layer in (1, -1):
        assert torch.allclose(first.target_hidden[layer][0, 0], full[layer][0, ids.shape[1] - 1], atol=1e-8)


def test_image_drafter_honours_a_confidence_draft_length():
    """ARDrafter is the core ModelDrafter: a ConfidenceDraftLength stops a row's drafting (it used to be
    ignored), and the output still equals the reference decoder."""
    target = tiny_ar()
    conds = [3, 7]
    expected = [list(reference_greedy(target, c, 3.0)) for c in conds]
    d = ig.ARDrafter(truncated_ar(target), mmspec.ConfidenceDraftLength(4, threshold=0.9))
    events = list(ig.generate_stream(target, condition=conds, method="exact", drafter=d, cfg_scale=3.0,
                                     temperature=0.0))
    rows = [[], []]
    for ev in events:
        for r, toks in zip(ev.rows, ev.tokens):
            rows[r].extend(toks)
    assert rows == expected
    drafted = [n for ev in events for n in ev.num_draft]
    fixed = [n for ev in ig.generate_stream(target, condition=conds, method="exact", drafter=truncated_ar(target),
                                            num_draft_tokens=4, cfg_scale=3.0, temperature=0.0) for n in ev.num_draft]
    assert any(0 < n < 4 for n in drafted)  # rows stop drafting early on low confidence
    assert sum(drafted) / len(drafted) < sum(fixed) / len(fixed)
