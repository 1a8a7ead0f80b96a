"""Fixed-point encoding (``mmspec.image_gen.fixed_point``): exact orbit cases on hand-made maps,
stability of the projection on tiny random VQ tokenizers (whose orbits end in 2-cycles), io, errors.
The shipped zoo tokenizer is tested in tests/test_zoo.py."""

import json

import pytest
import torch

from mmspec.image_gen import FixedPointEncoding, FixedPointError, VQTokenizer, tiny_vq_tokenizer
from mmspec.image_gen.fixed_point import find_fixed_points, snap_to_8bit
from mmspec.image_gen.tokenizer import TOKENIZER_CONFIG_NAME, TokenizerConfigError, pil_to_tensor, tensor_to_pil

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- exact cases on a hand-made map

# states are 1x1 grids holding 0..9;  0->1->2->2 | 3->4->3 | 5->6->7->5 | 8->9->9
NEXT = torch.tensor([1, 2, 2, 4, 3, 6, 7, 5, 9, 9])


def table_round_trip(cost_table):
    """round_trip over 1x1 grids: next state by NEXT, cost of a state for image row r by cost_table[r]."""
    calls = []

    def step(grids, rows):
        calls.append(len(rows))
        states = grids.flatten()
        return NEXT[states].view_as(grids), torch.tensor([cost_table[int(r)][int(s)] for r, s in zip(rows, states)])

    return step, calls


ZERO = [0.0] * 10


@pytest.mark.parametrize("start, cost, want, tail, cycle, passes", [
    (0, ZERO, 2, 2, 1, 3),                         # tail 0, 1 then the fixed point 2
    (2, ZERO, 2, 0, 1, 1),                         # already a fixed point: one pass to see it
    (3, ZERO, 3, 0, 2, 2),                         # 2-cycle {3, 4}, equal costs: smaller grid
    (4, ZERO, 3, 0, 2, 2),                         # the same cycle entered at 4: the same choice
    (3, [0, 0, 0, 5, 1, 0, 0, 0, 0, 0], 4, 0, 2, 2),   # cost decides inside the cycle
    (5, [0, 0, 0, 0, 0, 3, 1, 2, 0, 0], 6, 0, 3, 3),   # 3-cycle, cheapest member 6
    (7, [0, 0, 0, 0, 0, 3, 1, 2, 0, 0], 6, 0, 3, 3),   # ... from any entry point
    (8, ZERO, 9, 1, 1, 2),
])
def test_orbit_table(start, cost, want, tail, cycle, passes):
    step, _ = table_round_trip([cost])
    r = find_fixed_points(torch.tensor([[[start]]]), step, max_passes=10)
    assert r.tokens.flatten().tolist() == [want]
    assert (r.tail.item(), r.cycle_length.item(), r.passes.item()) == (tail, cycle, passes)


def test_batch_follows_each_orbit_and_drops_finished_ones():
    step, calls = table_round_trip([ZERO] * 4)
    r = find_fixed_points(torch.tensor([0, 2, 5, 8]).view(4, 1, 1), step, max_passes=10)
    assert r.tokens.flatten().tolist() == [2, 2, 5, 9]
    assert r.passes.tolist() == [3, 1, 3, 2]
    assert calls == [4, 3, 2]  # finished orbits leave the batch


def test_each_image_is_scored_against_its_own_row():
    """Rows finish at different passes; costs must still be those of the right image."""
    prefer_4 = [0, 0, 0, 5, 1, 0, 0, 0, 0, 0]
    prefer_3 = [0, 0, 0, 1, 5, 0, 0, 0, 0, 0]
    step, _ = table_round_trip([ZERO, prefer_4, prefer_3])
    r = find_fixed_points(torch.tensor([2, 3, 3]).view(3, 1, 1), step, max_passes=10)
    assert r.tokens.flatten().tolist() == [2, 4, 3]


def test_equal_costs_pick_the_lexicographically_smaller_grid():
    """1x2 grids: the 2-cycle [1, 0] <-> [0, 9] with equal costs resolves to [0, 9] from either side."""
    swap = {(1, 0): (0, 9), (0, 9): (1, 0)}

    def step(grids, rows):
        nxt = torch.tensor([swap[tuple(g.flatten().tolist())] for g in grids]).view_as(grids)
        return nxt, torch.zeros(len(rows))

    r = find_fixed_points(torch.tensor([[[1, 0]], [[0, 9]]]), step, max_passes=5)
    assert r.tokens.tolist() == [[[0, 9]], [[0, 9]]]
    assert r.cycle_length.tolist() == [2, 2]


def test_int32_grids_still_close_their_orbit():
    step, _ = table_round_trip([ZERO])

    def step32(grids, rows):
        nxt, cost = step(grids.long(), rows)
        return nxt.int(), cost

    r = find_fixed_points(torch.tensor([[[0]]], dtype=torch.int32), step32, max_passes=10)
    assert r.tokens.flatten().tolist() == [2]


def test_open_orbit_raises_with_count():
    step, _ = table_round_trip([ZERO, ZERO])
    with pytest.raises(FixedPointError, match=r"within 2 pass\(es\) for 1 of 2 image\(s\) \(first: index 0\)"):
        find_fixed_points(torch.tensor([0, 2]).view(2, 1, 1), step, max_passes=2)


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "8"])
def test_max_passes_must_be_positive_int(bad):
    with pytest.raises(FixedPointError, match="max_passes must be an int >= 1"):
        FixedPointEncoding(bad)


def test_snap_is_the_png_round_trip_bit_for_bit():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    assert torch.equal(snap_to_8bit(x), pil_to_tensor(tensor_to_pil(x), 16))
    assert torch.equal(snap_to_8bit(snap_to_8bit(x)), snap_to_8bit(x))


# ---------------------------------------------------------------- tiny random VQ tokenizers

def random_images(n, seed, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module", params=[0, 1, 2])
def fixed_tok(request):
    tok = tiny_vq_tokenizer(seed=request.param)
    return VQTokenizer(tok.vq_model, 32, encoding=FixedPointEncoding())


def test_nearest_code_round_trip_is_not_stable_for_random_tokenizers(fixed_tok):
    """The problem being solved: one nearest-code pass moves tokens on a random tokenizer."""
    t = fixed_tok.encode_nearest(random_images(4, 1))
    assert (fixed_tok.round_trip(t) != t).any()


def test_fixed_point_encoding_round_trips_exactly(fixed_tok):
    x = random_images(4, 2)
    r = fixed_tok.encode_fixed_points(x)
    assert torch.equal(r.tokens, fixed_tok.encode(x))
    assert (r.cycle_length > 1).any(), "the cycle branch must be exercised"  # random VQ: 2-cycles
    # exact through float tensors and through 8-bit PIL images, and again after a second pass
    assert torch.equal(fixed_tok.encode(fixed_tok.decode_tensor(r.tokens)), r.tokens)
    assert torch.equal(fixed_tok.encode(fixed_tok.decode(r.tokens)), r.tokens)
    # a chosen cycle member is a fixed point of g only when the cycle has length 1
    fixed, two = r.cycle_length == 1, r.cycle_length == 2
    g1 = fixed_tok.round_trip(r.tokens)
    assert torch.equal(g1[fixed], r.tokens[fixed])
    if two.any():
        assert (g1[two] != r.tokens[two]).flatten(1).any(1).all()
        assert torch.equal(fixed_tok.round_trip(g1)[two], r.tokens[two])
    # decoded in another order, or one image at a time, re-encoded one by one: still the same grids
    rev = fixed_tok.decode_tensor(r.tokens.flip(0)).flip(0)
    assert torch.equal(fixed_tok.encode(rev), r.tokens)
    singles = [fixed_tok.decode(r.tokens[i:i + 1])[0] for i in range(len(r.tokens))]
    assert torch.equal(torch.cat([fixed_tok.encode(im) for im in singles]), r.tokens)


def test_batch_composition_does_not_change_tokens():
    """48 images through a random tokenizer on which batched convolutions round differently from
    batch-1 ones (found in review: 2 tokens of image 25 moved).  Encoding runs one image at a time."""
    tok = tiny_vq_tokenizer(seed=1)
    tok = VQTokenizer(tok.vq_model, 32, encoding=FixedPointEncoding())
    x = random_images(48, 11)
    t = tok.encode(x)
    assert torch.equal(tok.encode(x[25:26]), t[25:26])
    assert torch.equal(tok.encode(tok.decode_tensor(t)), t)
    assert torch.equal(tok.encode(tok.decode(t[20:30])), t[20:30])


def test_fixed_point_is_found_for_other_sizes_and_pil_modes(fixed_tok):
    x = random_images(2, 5, size=40)[..., :, :36]  # float [2, 3, 40, 36]: resized to 32 x 32 first
    t = fixed_tok.encode(x)
    assert torch.equal(fixed_tok.encode(fixed_tok.decode(t)), t)
    gray = tensor_to_pil(random_images(1, 6, size=50))[0].convert("L")
    t = fixed_tok.encode(gray)
    assert torch.equal(fixed_tok.encode(fixed_tok.decode(t)), t)


def test_half_precision_weights_are_refused():
    tok = tiny_vq_tokenizer()
    tok = VQTokenizer(tok.vq_model.to(torch.bfloat16), 32, encoding=FixedPointEncoding())
    with pytest.raises(TokenizerConfigError, match="needs float32 or float64 weights.*bfloat16"):
        tok.encode(random_images(1, 0))


def test_fixed_point_encoding_is_deterministic_and_batch_independent(fixed_tok):
    x = random_images(3, 3)
    t = fixed_tok.encode(x)
    assert torch.equal(fixed_tok.encode(x), t)
    assert torch.equal(torch.cat([fixed_tok.encode(x[i:i + 1]) for i in range(3)]), t)
    assert torch.equal(fixed_tok.encode(tensor_to_pil(x)), t)  # 8-bit PIL input == its tensor


def test_max_passes_too_small_raises(fixed_tok):
    with pytest.raises(FixedPointError, match=r"did not return to an earlier token grid within 1 pass\(es\)"):
        fixed_tok.encode_fixed_points(random_images(2, 4), max_passes=1)


# ---------------------------------------------------------------- io and configuration

def test_encoding_is_saved_and_restored(tmp_path):
    tok = tiny_vq_tokenizer()
    VQTokenizer(tok.vq_model, 32, encoding=FixedPointEncoding(17)).save_pretrained(tmp_path / "f")
    tok.save_pretrained(tmp_path / "n")
    assert VQTokenizer.from_pretrained(tmp_path / "f").encoding == FixedPointEncoding(17)
    assert VQTokenizer.from_pretrained(tmp_path / "n").encoding is None
    assert VQTokenizer.from_pretrained(tmp_path / "f", encoding=None).encoding is None  # override
    # a version-1 file written before the field existed means nearest codes
    meta = json.loads((tmp_path / "f" / TOKENIZER_CONFIG_NAME).read_text())
    del meta["encoding"]
    (tmp_path / "f" / TOKENIZER_CONFIG_NAME).write_text(json.dumps(meta))
    assert VQTokenizer.from_pretrained(tmp_path / "f").encoding is None


@pytest.mark.parametrize("encoding, message", [
    ({"name": "lookahead"}, "unknown encoding"),
    ("fixed_point", "unknown encoding"),
    ({"name": "fixed_point", "max_passes": "8"}, "max_passes must be an int"),
    ({"name": "fixed_point", "max_passes": 0}, "max_passes must be an int"),
])
def test_bad_saved_encoding_is_a_config_error(tmp_path, encoding, message):
    tiny_vq_tokenizer().save_pretrained(tmp_path)
    meta = json.loads((tmp_path / TOKENIZER_CONFIG_NAME).read_text())
    meta["encoding"] = encoding
    (tmp_path / TOKENIZER_CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(TokenizerConfigError, match=message):
        VQTokenizer.from_pretrained(tmp_path)


def test_encoding_must_be_a_strategy_object():
    with pytest.raises(TokenizerConfigError, match="encoding must be None .* or a FixedPointEncoding"):
        VQTokenizer(tiny_vq_tokenizer().vq_model, 32, encoding="fixed_point")
