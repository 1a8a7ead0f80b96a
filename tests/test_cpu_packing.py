"""Pre-packed oneDNN linear weights (mmspec.cpu_packing): same outputs up to rounding, greedy decoding
still token-identical to HF generate on the packed model, training and changed weights handled."""

from __future__ import annotations

import pytest
import torch

from mmspec import engine
from mmspec.cpu_packing import (bf16_native, pack_linear_weights, packed_dtype, packing_available,
                                unpack_linear_weights)
from tiny_models import build

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear packing")


def _model():
    torch.manual_seed(0)
    return build("llama", vocab=96, hidden=64, layers=2, dtype=torch.float32).eval()


def test_packed_model_gives_the_same_logits_up_to_rounding():
    model = _model()
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
        n = pack_linear_weights(model)
        got = model(ids).logits
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert unpack_linear_weights(model) == n
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_greedy_decoding_on_a_packed_target_equals_hf_generate():
    target, drafter = _model(), build("llama", vocab=96, hidden=32, layers=1, dtype=torch.float32).eval()
    pack_linear_weights(target)
    pack_linear_weights(drafter)
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                              pad_token_id=0)
    for d in (drafter, "prompt_lookup"):
        out = engine.generate(target, ids, drafter=d, num_draft_tokens=3, max_new_tokens=20)
        assert torch.equal(out.sequences[:, : ref.shape[1]], ref)


def test_training_uses_the_ordinary_forward_and_a_changed_weight_is_repacked():
    model = _model()
    pack_linear_weights(model)
    ids = torch.randint(0, 96, (1, 5))
    loss = model(ids).logits.sum()  # autograd on: the ordinary forward, gradients reach the weights
    loss.backward()
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert lin.weight.grad is not None
    with torch.no_grad():
        lin.weight.mul_(2.0)
        x = torch.randn(3, lin.in_features)
        torch.testing.assert_close(lin(x), x @ lin.weight.T, rtol=1e-4, atol=1e-4)


def test_a_bf16_packed_drafter_drafts_close_and_greedy_output_stays_the_targets():
    """bf16 copies (drafters only, on CPUs with native bf16): logits within bf16 rounding, the target's greedy output
    unchanged; elsewhere nothing is packed (emulated bf16 is slower than float32)."""
    target, drafter = _model(), build("llama", vocab=96, hidden=32, layers=1, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (3, 7))
    with torch.no_grad():
        ref = drafter(ids).logits
        n = pack_linear_weights(drafter, dtype=torch.bfloat16)
        got = drafter(ids).logits
    if not bf16_native():
        assert n == 0 and packed_dtype(drafter) is None
        return
    assert n == sum(isinstance(m, torch.nn.Linear) for m in drafter.modules())
    assert packed_dtype(drafter) == torch.bfloat16 and got.dtype == torch.float32 and not torch.equal(got, ref)
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05)
    with torch.no_grad():
        out_ref = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                  pad_token_id=0)
    out = engine.generate(target, ids, drafter=drafter, num_draft_tokens=3, max_new_tokens=20)
    assert torch.equal(out.sequences[:, : out_ref.shape[1]], out_ref)
    assert unpack_linear_weights(drafter) == n and packed_dtype(drafter) is None
    with pytest.raises(ValueError, match="packs float32 or bfloat16 copies"):
        pack_linear_weights(drafter, dtype=torch.float16)
