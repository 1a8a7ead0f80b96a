"""AttentionCapture (vision/attention_capture.py): SDPA-run capture == eager output_attentions average."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

from mmspec.vision import attention_capture as ac  # noqa: E402
from mmspec.vision.attention_capture import AttentionCapture  # noqa: E402

ATOL = 1e-5


# ----------------------------------------------------------------------------- tiny VLMs + inputs
def _llava(seed: int = 0):
    torch.manual_seed(seed)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=4, projection_dim=32)
    tc = LlamaConfig(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=100, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


def _llava_inputs(batch: int):
    img = [100] * 64  # (32 / 4) ** 2 image tokens
    rows = [[1, 5, 6] + img + [7, 8, 9, 10], [1, 11] + img + [12, 13]][:batch]
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch, 3, 32, 32, generator=g)
    return _pad_left(rows, 100, dict(pixel_values=pixel_values))


def _qwen_vl_cfg_kwargs():
    return dict(image_token_id=150, video_token_id=151, vision_start_token_id=152, vision_end_token_id=153)


def _qwen2_vl(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        **_qwen_vl_cfg_kwargs())
    return Qwen2VLForConditionalGeneration(cfg).eval()


def _qwen2_5_vl(seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=16, fullatt_block_indexes=[1]),
        **_qwen_vl_cfg_kwargs())
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _qwen_inputs(batch: int):
    # image 0: 8x8 patches -> 16 merged tokens; image 1: 4x8 patches -> 8 merged tokens
    grids = [[1, 8, 8], [1, 4, 8]][:batch]
    rows = [[1, 5, 152] + [150] * 16 + [153, 7, 8, 9], [1, 152] + [150] * 8 + [153, 7, 8]][:batch]
    n_patches = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(2)
    extra = dict(pixel_values=torch.randn(n_patches, 3 * 2 * 4 * 4, generator=g),
                 image_grid_thw=torch.tensor(grids))
    inputs, qmask, kmask = _pad_left(rows, 150, extra)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == 150).long()  # 1 at image tokens
    return inputs, qmask, kmask


def _pad_left(rows, image_token: int, extra: dict):
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    am = torch.zeros(len(rows), L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        am[b, L - len(r):] = 1
    inputs = dict(input_ids=ids, attention_mask=am, **extra)
    key_mask = ids == image_token
    pos = torch.arange(L).expand_as(ids)
    last_img = torch.where(key_mask, pos, torch.full_like(pos, -1)).max(dim=1, keepdim=True).values
    query_mask = (pos > last_img) & am.bool()
    return inputs, query_mask, key_mask


BUILDERS = {"llava": (_llava, _llava_inputs), "qwen2_vl": (_qwen2_vl, _qwen_inputs),
            "qwen2_5_vl": (_qwen2_5_vl, _qwen_inputs)}


def _build(arch: str, batch: int):
    build, make_inputs = BUILDERS[arch]
    try:
        vlm = build()
    except ImportError as e:  # pragma: no cover - older transformers without the architecture
        pytest.skip(f"{arch} unavailable: {e}")
    vlm.set_attn_implementation("sdpa")
    (inputs, qmask, kmask) = make_inputs(batch)
    return vlm, inputs, qmask, kmask


def _eager_copy(vlm):
    eager = copy.deepcopy(vlm)
    eager.set_attn_implementation("eager")
    assert eager.model.language_model.config._attn_implementation == "eager"
    return eager


def _eager_reference(eager_vlm, inputs, qmask, kmask, layers):
    with torch.no_grad():
        out = eager_vlm(**inputs, output_attentions=True)
    n_layers = len(eager_vlm.model.language_model.layers)
    attn = out.attentions
    assert attn is not None and len(attn) == n_layers  # the text model's attentions
    layers = range(n_layers) if layers is None else [i % n_layers for i in layers]
    avg = torch.stack([attn[i] for i in layers]).float().mean(dim=(0, 2))  # [B, L(q), L(k)]
    ref = torch.zeros(kmask.shape, dtype=torch.float32)
    for b in range(kmask.shape[0]):
        ref[b] = avg[b][qmask[b]].mean(dim=0)
    return ref.masked_fill(~kmask, 0.0)


def _capture(vlm, inputs, qmask, kmask, layers):
    with torch.no_grad(), AttentionCapture(vlm.model.language_model, qmask, kmask, layers=layers) as cap:
        logits = vlm(**inputs).logits
    return cap.scores, logits


def _hooks(vlm):
    """All forward (pre-)hooks of the model (transformers installs its own output-recording hooks lazily)."""
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in vlm.named_modules()}


def _no_leftovers(vlm, local_before, hooks_before=None):
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == local_before
    assert ac._PATCHES == {}
    if hooks_before is not None:
        assert _hooks(vlm) == hooks_before


# ----------------------------------------------------------------------------- SDPA capture == eager
CASES = [
    ("llava", 1, None), ("llava", 1, [0, 2]), ("llava", 2, None), ("llava", 2, [-1]),
    ("qwen2_vl", 1, None), ("qwen2_vl", 2, None), ("qwen2_vl", 2, [1]),
    ("qwen2_5_vl", 2, None),
]


@pytest.mark.parametrize("arch,batch,layers", CASES)
def test_sdpa_capture_matches_eager_attentions(arch, batch, layers):
    vlm, inputs, qmask, kmask = _build(arch, batch)
    assert vlm.model.language_model.config._attn_implementation == "sdpa"
    local_before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    with torch.no_grad():
        logits_plain = vlm(**inputs).logits
    hooks_before = _hooks(vlm)

    scores, logits_cap = _capture(vlm, inputs, qmask, kmask, layers)
    ref = _eager_reference(_eager_copy(vlm), inputs, qmask, kmask, layers)

    assert scores.dtype == torch.float32 and scores.shape == kmask.shape
    assert torch.all(scores[~kmask] == 0)
    assert torch.all(scores[kmask] > 0)
    torch.testing.assert_close(scores, ref, atol=ATOL, rtol=1e-4)
    # the softmax runs over all allowed keys (text too): image mass per query is < 1 and matches the reference
    assert torch.all(scores.sum(dim=1) < 1)
    # capture does not change the SDPA computation, and nothing is left patched afterwards
    assert torch.equal(logits_cap, logits_plain)
    with torch.no_grad():
        assert torch.equal(vlm(**inputs).logits, logits_plain)
    _no_leftovers(vlm, local_before, hooks_before)


def test_flex_attention_block_mask():
    vlm, inputs, qmask, kmask = _build("llava", 2)
    ref = _eager_reference(_eager_copy(vlm), inputs, qmask, kmask, None)
    try:
        vlm.set_attn_implementation("flex_attention")
        with torch.no_grad():
            vlm(**inputs)
    except Exception as e:  # flex attention unavailable on this platform / torch build
        pytest.skip(f"flex_attention unavailable: {e}")
    scores, _ = _capture(vlm, inputs, qmask, kmask, None)
    torch.testing.assert_close(scores, ref, atol=ATOL, rtol=1e-4)


def test_padded_rows_and_images_differ():
    vlm, inputs, qmask, kmask = _build("llava", 2)
    scores, _ = _capture(vlm, inputs, qmask, kmask, None)
    # row 1 is left padded and sees another image: its distribution differs from row 0's
    assert not torch.allclose(scores[0, kmask[0]], scores[1, kmask[1]])
    assert inputs["attention_mask"][1, 0] == 0 and scores[1, 0] == 0


def test_eager_model_inside_capture_uses_returned_weights():
    vlm, inputs, qmask, kmask = _build("qwen2_vl", 2)
    eager = _eager_copy(vlm)
    ref = _eager_reference(eager, inputs, qmask, kmask, [0])
    local_before, hooks_before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping), _hooks(eager)
    scores, _ = _capture(eager, inputs, qmask, kmask, [0])
    torch.testing.assert_close(scores, ref, atol=ATOL, rtol=1e-4)
    _no_leftovers(eager, local_before, hooks_before)


def test_only_the_first_forward_is_captured():
    vlm, inputs, qmask, kmask = _build("llava", 1)
    ref = _eager_reference(_eager_copy(vlm), inputs, qmask, kmask, None)
    with torch.no_grad(), AttentionCapture(vlm.model.language_model, qmask, kmask) as cap:
        with pytest.raises(RuntimeError, match="no forward"):
            _ = cap.scores
        vlm.generate(**inputs, max_new_tokens=3, do_sample=False)  # prefill + decode steps
    torch.testing.assert_close(cap.scores, ref, atol=ATOL, rtol=1e-4)


def test_exception_inside_block_restores_everything():
    vlm, inputs, qmask, kmask = _build("qwen2_vl", 1)
    with torch.no_grad():
        vlm(**inputs)
    local_before, hooks_before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping), _hooks(vlm)
    sdpa_before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(KeyError):
        with AttentionCapture(vlm.model.language_model, qmask, kmask):
            assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_before
            raise KeyError("boom")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before
    _no_leftovers(vlm, local_before, hooks_before)
    # a shape mismatch raised from inside the forward also leaves nothing behind
    with pytest.raises(ValueError, match="query_mask"):
        with torch.no_grad(), AttentionCapture(vlm.model.language_model, qmask[:, :-1], kmask):
            vlm(**inputs)
    _no_leftovers(vlm, local_before, hooks_before)


def test_nested_captures_on_two_models_exit_in_any_order():
    v1, in1, q1, k1 = _build("llava", 1)
    v2, in2, q2, k2 = _build("qwen2_vl", 1)
    with torch.no_grad():
        v1(**in1)
        v2(**in2)
    local_before, h1, h2 = dict(ALL_ATTENTION_FUNCTIONS._local_mapping), _hooks(v1), _hooks(v2)
    c1 = AttentionCapture(v1.model.language_model, q1, k1).__enter__()
    c2 = AttentionCapture(v2.model.language_model, q2, k2).__enter__()
    with torch.no_grad():
        v1(**in1)
        v2(**in2)
    c1.__exit__(None, None, None)  # out of order
    assert len(ac._PATCHES) == 1  # c2 still active, sharing the one dispatcher
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is next(iter(ac._PATCHES.values())).dispatch
    c2.__exit__(None, None, None)
    _no_leftovers(v1, local_before, h1)
    _no_leftovers(v2, local_before, h2)
    torch.testing.assert_close(c1.scores, _eager_reference(_eager_copy(v1), in1, q1, k1, None), atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(c2.scores, _eager_reference(_eager_copy(v2), in2, q2, k2, None), atol=ATOL, rtol=1e-4)


def test_argument_validation():
    vlm, _, qmask, kmask = _build("llava", 1)
    with pytest.raises(TypeError, match="layers"):
        AttentionCapture(vlm, qmask, kmask)  # whole VLM instead of its text model
    with pytest.raises(IndexError):
        AttentionCapture(vlm.model.language_model, qmask, kmask, layers=[3])
    with pytest.raises(ValueError):
        AttentionCapture(vlm.model.language_model, qmask, kmask[:0])


# ----------------------------------------------------------------------------- mask formats (unit level)
def _unit_setup(seed=0, B=2, L=9):
    from transformers import LlamaModel

    torch.manual_seed(seed)
    lm = LlamaModel(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2)).eval()
    attn = lm.layers[0].self_attn
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, L, 8, generator=g)
    k = torch.randn(B, 2, L, 8, generator=g)
    v = torch.randn(B, 2, L, 8, generator=g)
    pad = torch.ones(B, L, dtype=torch.long)
    pad[1, :3] = 0  # row 1 left padded
    qmask = torch.zeros(B, L, dtype=torch.bool)
    qmask[:, 6:] = True
    kmask = torch.zeros(B, L, dtype=torch.bool)
    kmask[:, 2:6] = True
    return lm, attn, q, k, v, pad, qmask, kmask


def _unit_reference(attn, q, k, v, allowed, qmask, kmask):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    _, w = eager_attention_forward(attn, q, k, v, bias, scaling=attn.scaling)
    avg = w.mean(dim=1)
    ref = torch.stack([avg[b][qmask[b]].mean(0) for b in range(q.shape[0])])
    return ref.masked_fill(~kmask, 0.0)


def _unit_run(lm, attn, name, call, qmask, kmask, lm_padding=None):
    iface = {name: lambda *a, **kw: (None, None)}  # a plain mapping standing in for AttentionInterface
    cap = AttentionCapture(lm, qmask, kmask)
    patch = ac._acquire_patch(iface, name, cap)
    try:
        assert iface[name] is patch.dispatch
        cap._armed, cap._lm_padding = True, lm_padding  # what the language model's pre-hook does
        call(iface[name])
        cap._armed, cap._done = False, True
    finally:
        ac._release_patch(patch, cap)
    assert iface[name] is not patch.dispatch and ac._PATCHES == {}
    return cap.scores


@pytest.mark.parametrize("form", ["bool4d", "float4d", "none", "pad2d", "window2d", "none_lm_padding"])
def test_mask_formats(form):
    lm, attn, q, k, v, pad, qmask, kmask = _unit_setup()
    B, L = pad.shape
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    allowed = causal[None, None] & pad.bool()[:, None, None, :]
    name, kwargs, mask, lm_padding = "sdpa", {}, None, None
    if form == "bool4d":
        mask = allowed
    elif form == "float4d":
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    elif form == "none":
        allowed = causal[None, None].expand(B, 1, L, L)
    elif form == "pad2d":
        name, mask = "flash_attention_2", pad
    elif form == "window2d":
        name, mask, kwargs = "flash_attention_2", pad, {"sliding_window": 3}
        i = torch.arange(L)
        allowed = allowed & ((i[:, None] - i[None, :]) < 3)[None, None]
    elif form == "none_lm_padding":
        name, lm_padding = "flash_attention_2", pad.bool()
    ref = _unit_reference(attn, q, k, v, allowed, qmask, kmask)
    got = _unit_run(lm, attn, name, lambda fn: fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling,
                                                  **kwargs), qmask, kmask, lm_padding)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


def test_small_chunks_give_same_result():
    lm, attn, q, k, v, pad, qmask, kmask = _unit_setup()
    qmask[:, 3:] = True
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None] & pad.bool()[:, None, None, :]
    results = []
    for chunk in (1 << 24, 1):
        iface = {"sdpa": lambda *a, **kw: (None, None)}
        cap = AttentionCapture(lm, qmask, kmask, chunk_elems=chunk)
        patch = ac._acquire_patch(iface, "sdpa", cap)
        cap._armed = True
        iface["sdpa"](attn, q, k, v, mask, scaling=attn.scaling)
        cap._armed, cap._done = False, True
        ac._release_patch(patch, cap)
        results.append(cap.scores)
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)


def test_row_without_queries_scores_zero():
    lm, attn, q, k, v, pad, qmask, kmask = _unit_setup()
    qmask[1] = False
    mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None, None] & pad.bool()[:, None, None, :]
    got = _unit_run(lm, attn, "sdpa", lambda fn: fn(attn, q, k, v, mask, scaling=attn.scaling), qmask, kmask)
    assert torch.all(got[1] == 0) and torch.all(got[0][kmask[0]] > 0)
