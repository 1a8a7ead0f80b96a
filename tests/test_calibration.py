"""Calibration (mmspec.calibration): the speed model's exact cases, a chosen shape that decodes
token-identically to HF generate, a target left exactly as loaded, the cache, and named errors."""

from __future__ import annotations

import json

import pytest
import torch

from mmspec import engine
from mmspec.calibration import (Calibration, CalibrationError, DraftShape, accept_at_least, calibrate, chain_rate,
                                chain_tokens_per_step, fingerprint, head_drafters)
from mmspec.cpu_packing import bf16_native, is_packed, packed_dtype, packing_available
from mmspec.drafters.cost_model import CostModel
from test_feature_drafter import make_head
from tiny_models import build


def test_speed_model_exact_cases():
    # 10 row steps accepting 0, 1, 2 or 3 of 3 drafts: 4, 3, 2 and 1 times
    acc = accept_at_least([4, 3, 2, 1], 3)
    assert acc == pytest.approx((0.6, 0.3, 0.1))
    assert chain_tokens_per_step(acc, 2) == pytest.approx(1.9)
    cost = CostModel(widths=(1, 2, 4), seconds=(0.010, 0.012, 0.016))
    # k = 2: verify 3 tokens = 0.014 s, two levels of 1 ms, 2 ms overhead -> 1.9 / 0.018
    assert chain_rate(acc, 2, cost, 0.001, 0.002) == pytest.approx(1.9 / 0.018)
    assert accept_at_least([], 2) == (0.0, 0.0)


def _calibration(expected: dict, plain: float) -> Calibration:
    best = max(expected, key=expected.get)
    return Calibration.from_json({
        "best": {"k": int(best.split("=")[1]), "tree": None}, "expected_tokens_per_s": expected,
        "plain_tokens_per_s": plain, "cost": {"widths": [1, 2, 4], "seconds": [0.010, 0.012, 0.016]},
        "level_seconds": 0.001, "overhead_seconds": 0.0, "accept_at_least": [0.5, 0.2], "runs": {},
        "drafter_packed": False, "packing": {}, "machine": "m", "seconds": 1.0, "notes": []})


def test_the_choice_is_no_drafts_when_plain_decoding_is_expected_to_be_faster():
    pays = _calibration({"chain k=1": 120.0, "chain k=2": 110.0}, plain=100.0)
    assert pays.pays and pays.choice == DraftShape(k=1) and pays.summary().startswith("calibrated draft shape: chain k=1")
    slower = _calibration({"chain k=1": 90.0, "chain k=2": 80.0}, plain=100.0)
    assert not slower.pays and slower.choice is None
    assert slower.summary().startswith("no drafts: decoding without them is expected to be faster here")
    # ceiling: tau / (verify(1 + d) + L c): tau 1.5, one draft a step (verify 2 = 1.2), one level of c = 0.1
    assert pays.ceiling(1.5, 1.0, 1.0) == pytest.approx(1.5 / 1.3)
    assert pays.ceiling(1.0, 0.0, 0.0) == pytest.approx(1.0)  # no drafts: no gain, no cost


@pytest.mark.parametrize("bad, match", [(dict(k=0), "chain needs k >= 1"), (dict(tree=(3, 2)), "depth, top_k"),
                                        (dict(tree=(3, 0, 4)), "depth, top_k")])
def test_bad_shapes_are_named_errors(bad, match):
    with pytest.raises(CalibrationError, match=match):
        DraftShape(**bad)


def _drafters(head):
    return head_drafters(head)


def test_calibration_chooses_a_measured_shape_caches_it_and_leaves_the_target_as_loaded(tmp_path):
    torch.manual_seed(0)
    target = build("llama", layers=3)
    head = make_head(target)
    before = fingerprint(target)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    prompts = [torch.tensor([[5, 17, 33, 9, 5, 17, 33]]), torch.tensor([[3, 4, 5, 6]])]
    messages = []
    cal = calibrate(target, _drafters(head), prompts, k_max=4, trees=((3, 2, 4),), max_new_tokens=12,
                    drafter_module=head, cache_dir=tmp_path, progress=messages.append)
    assert set(cal.expected_tokens_per_s) == {"chain k=1", "chain k=2", "chain k=3", "chain k=4", "tree 3/2/4"}
    assert cal.best.label == max(cal.expected_tokens_per_s, key=cal.expected_tokens_per_s.get)
    assert len(cal.accept_at_least) == 4 and all(a >= b for a, b in zip(cal.accept_at_least, cal.accept_at_least[1:]))
    assert cal.cost.widths[0] == 1 and cal.cost.widths[-1] == 32 and cal.plain_tokens_per_s > 0
    assert messages and not cal.cached
    assert ("calibrated draft shape" if cal.pays else "no drafts") in cal.summary()
    assert cal.choice == (cal.best if cal.pays else None)
    # the target is exactly as loaded: same weights, no packed layers
    assert fingerprint(target) == before
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    assert not is_packed(target)
    # the chosen shape decodes exactly like HF generate on the model as loaded
    ids = torch.tensor([[7, 8, 9, 10, 7, 8]])
    ref = target.generate(input_ids=ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out = engine.generate(target, ids, drafter=_drafters(head)(cal.best, cal.cost), max_new_tokens=16,
                          num_draft_tokens=cal.best.k or None)
    assert torch.equal(out.sequences[:, :ref.shape[1]], ref)
    # a second call with the same inputs reads the cache; other inputs measure again
    again = calibrate(target, _drafters(head), prompts, k_max=4, trees=((3, 2, 4),), max_new_tokens=12,
                      drafter_module=head, cache_dir=tmp_path)
    assert again.cached and again.best == cal.best and again.expected_tokens_per_s == cal.expected_tokens_per_s
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["machine"] == cal.machine
    # a cached "packed" choice packs the drafter again (a fresh process loads it unpacked); "unpacked" unpacks it
    entry = json.loads(files[0].read_text())
    for choice, dtype in ((True, "float32"), (True, "bfloat16"), (False, "float32"), (True, "float32")):
        files[0].write_text(json.dumps({**entry, "drafter_packed": choice, "drafter_dtype": dtype}))
        got = calibrate(target, _drafters(head), prompts, k_max=4, trees=((3, 2, 4),), max_new_tokens=12,
                        drafter_module=head, cache_dir=tmp_path)
        can_pack = packing_available() and next(head.parameters()).dtype == torch.float32
        can = choice and can_pack and (dtype == "float32" or bf16_native())
        assert packed_dtype(head) == (getattr(torch, dtype) if can else None) and not is_packed(target)
        assert got.drafter_setting == ("unpacked" if not choice else "packed bf16" if dtype == "bfloat16" else "packed")
    other = calibrate(target, _drafters(head), prompts, k_max=2, trees=(), max_new_tokens=12, cache_dir=tmp_path)
    assert not other.cached and set(other.expected_tokens_per_s) == {"chain k=1", "chain k=2"}
    assert any("packing not measured" in n for n in other.notes)


@pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear packing")
def test_a_float32_drafter_is_timed_in_every_cpu_setting_and_keeps_the_fastest(tmp_path):
    """Unpacked, packed and, where the CPU runs bf16 natively, a bf16 copy (drafters only): the fastest is kept, the
    target is never packed, and the chosen setting still decodes exactly like HF generate."""
    torch.manual_seed(0)
    target = build("llama", layers=2, dtype=torch.float32)
    head = make_head(target).float().attach(target)
    prompts = [torch.tensor([[5, 17, 33, 9, 5, 17, 33]])]
    cal = calibrate(target, _drafters(head), prompts, k_max=2, trees=(), max_new_tokens=8, drafter_module=head,
                    cache_dir=None)
    assert set(cal.packing) == {"unpacked", "packed"} | ({"packed bf16"} if bf16_native() else set())
    fastest = min(cal.packing, key=cal.packing.get)
    assert cal.drafter_setting == fastest and f"drafter {fastest}" in cal.summary()
    assert packed_dtype(head) == {"unpacked": None, "packed": torch.float32, "packed bf16": torch.bfloat16}[fastest]
    assert not is_packed(target)
    assert bf16_native() or any("bf16 not measured" in n for n in cal.notes)
    ids = torch.tensor([[7, 8, 9, 10, 7, 8]])
    ref = target.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = engine.generate(target, ids, drafter=_drafters(head)(DraftShape(k=2), cal.cost), max_new_tokens=12,
                          num_draft_tokens=2)
    assert torch.equal(out.sequences[:, :ref.shape[1]], ref)


def test_calibration_names_bad_input_before_measuring():
    target = build("llama", layers=1)
    head = make_head(target)
    with pytest.raises(CalibrationError, match="at least one prompt"):
        calibrate(target, _drafters(head), [], cache_dir=None)
    with pytest.raises(CalibrationError, match="k_max >= 1"):
        calibrate(target, _drafters(head), [torch.tensor([[1, 2]])], k_max=0, cache_dir=None)


def test_smollm2s_calibrated_head_falls_back_to_cost_aware_prompt_lookup_when_the_head_does_not_pay(monkeypatch):
    """`mmspec run`, `text` and `chat` take SmolLM2's head through calibrated_head_drafter: where the calibration
    expects plain decoding to be faster than the head they run prompt lookup with a cost-aware k over the
    calibration's costs (no drafts where copying is not expected to pay) instead of running slower."""
    from mmspec.drafters import CostAwareDraftLength, PromptLookupDrafter
    import mmspec.zoo.smollm2 as zs

    target = build("llama", layers=1)
    head = make_head(target)
    monkeypatch.setattr(zs, "chat_inputs", lambda tok, texts: {"input_ids": torch.tensor([[1, 2, 3]])})
    # plain faster; the head 1.90x; the head pays 1.05x, below the 1.10x cost-aware lookup measured; 1.11x
    for (expected, plain), head_runs in ((({"chain k=1": 90.0, "chain k=2": 80.0}, 100.0), False),
                                         (({"chain k=1": 90.0, "chain k=2": 95.0}, 50.0), True),
                                         (({"chain k=1": 105.0, "chain k=2": 80.0}, 100.0), False),
                                         (({"chain k=1": 111.0, "chain k=2": 80.0}, 100.0), True)):
        cal = _calibration(expected, plain)
        monkeypatch.setattr(zs, "calibrate", lambda *a, **k: cal)
        drafter, k, got = zs.calibrated_head_drafter(target, None, head)
        assert got is cal and zs.head_beats_lookup(cal) == head_runs
        if head_runs:
            assert drafter is not None and k == cal.best.k and "drafter: prompt lookup" not in zs.calibration_line(cal)
        else:
            assert isinstance(drafter, PromptLookupDrafter) and isinstance(k, CostAwareDraftLength)
            assert k.cost_model is cal.cost and k.min_k == 0
            assert "drafter: prompt lookup, cost-aware k (calibrated: the head" in zs.calibration_line(cal)
    assert "x1.05 is below the x1.10" in zs.calibration_line(_calibration({"chain k=1": 105.0}, 100.0))


def test_the_time_split_per_step_is_exact():
    from mmspec.stats import GenerationStats

    st = GenerationStats(steps=4, prefill_time=0.5, target_time=0.4, drafter_time=0.08, verify_time=0.004,
                         total_time=1.1)
    # per step: 100 ms target, 20 drafter, 1 verify, and the rest of the 600 ms after the prefill: 29
    assert st.split_ms_per_step() == pytest.approx({"target": 100.0, "drafter": 20.0, "verify": 1.0, "rest": 29.0})
    assert st.split_ms_per_step(1.5)["rest"] == pytest.approx(129.0)  # a wall time measured around the call
