"""Token-space resolution changes of MuLo-SD (:mod:`mmspec.image_gen.token_resampler`)."""

import pytest
import torch

from mmspec.errors import MMSpecError
from mmspec.image_gen.token_resampler import PixelResampler, Resampler, TokenResampler, TokenResamplerConfig


def _net(vocab=16, scale=2, seed=0):
    torch.manual_seed(seed)
    return TokenResampler(TokenResamplerConfig(vocab_size=vocab, scale=scale, width=16, depth=2)).eval()


@pytest.mark.parametrize("scale", [2, 4])
def test_learned_resampler_shapes_and_row_causality(scale):
    net = _net(scale=scale)
    g = torch.Generator().manual_seed(1)
    low = torch.randint(0, 16, (3, 4, 4), generator=g)
    high = torch.randint(0, 16, (3, 4 * scale, 4 * scale), generator=g)
    up, down = net.upsample(low), net.downsample(high)
    assert up.shape == (3, 4 * scale, 4 * scale) and up.dtype == torch.long
    assert down.shape == (3, 4, 4) and int(up.max()) < 16 and int(down.min()) >= 0
    for i in range(4):  # row i's outputs never see later rows
        low2, high2 = low.clone(), high.clone()
        low2[:, i + 1:] = torch.randint(0, 16, low2[:, i + 1:].shape, generator=g)
        high2[:, scale * (i + 1):] = torch.randint(0, 16, high2[:, scale * (i + 1):].shape, generator=g)
        lu, lu2 = net.up_logits(low), net.up_logits(low2)
        assert torch.equal(lu[..., : scale * (i + 1), :], lu2[..., : scale * (i + 1), :])
        assert torch.equal(net.down_logits(high)[..., : i + 1, :], net.down_logits(high2)[..., : i + 1, :])
    # batch independence: a grid's result does not depend on its neighbours
    assert torch.equal(net.upsample(low[1:2]), up[1:2]) and torch.equal(net.downsample(high[2:]), down[2:])


def test_learned_resampler_save_load_and_bad_input(tmp_path):
    net = _net()
    net.save_pretrained(tmp_path / "r")
    back = TokenResampler.from_pretrained(tmp_path / "r")
    low = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.upsample(low), net.upsample(low)) and isinstance(back, Resampler)
    with pytest.raises(MMSpecError, match=r"ids must be in \[0, 16\)"):
        net.upsample(torch.full((1, 4, 4), 16))
    with pytest.raises(MMSpecError, match="must be a long tensor"):
        net.downsample(torch.zeros(8, 8))
    with pytest.raises(MMSpecError, match="not divisible by the scale 2"):
        net.downsample(torch.zeros(1, 7, 8, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="no token resampler"):
        TokenResampler.from_pretrained(tmp_path / "missing")


def test_pixel_resampler_matches_decode_resize_encode():
    from mmspec.image_gen import tiny_vq_tokenizer
    from mmspec.image_gen.token_resampler import resize_images

    tok = tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16)
    px = PixelResampler(tok, 2)
    low = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(3))
    lo_tok = tok.resized(16)
    expected = tok.encode(resize_images(lo_tok.decode_tensor(low[1:]), 32))
    assert torch.equal(px.upsample(low)[1:], expected)
    assert px.downsample(torch.zeros(1, 8, 8, dtype=torch.long)).shape == (1, 4, 4)
    with pytest.raises(MMSpecError, match="scale 3 must be >= 2 and divide"):
        PixelResampler(tok, 3)


def test_imagegen_cli_takes_a_resampler(tmp_path):
    from mmspec.cli import main
    from mmspec.image_gen import tiny_vq_tokenizer
    from tiny_image_models import tiny_ar

    tiny_vq_tokenizer(image_size=32, num_vq_embeddings=16).save_pretrained(tmp_path / "tok")
    tiny_ar(grid=8, codebook=16, dtype=torch.float32).save_pretrained(tmp_path / "hi")
    tiny_ar(grid=4, codebook=16, seed=3, dtype=torch.float32).save_pretrained(tmp_path / "lo")
    _net().save_pretrained(tmp_path / "res")
    common = ["imagegen", "--model", str(tmp_path / "hi"), "--tokenizer", str(tmp_path / "tok"), "--class", "1",
              "--resampler", str(tmp_path / "res")]
    rc = main(common + ["--drafter", str(tmp_path / "lo"), "--method", "mulo", "--mulo-tau", "0.2",
                        "--out", str(tmp_path / "o")])
    assert rc == 0 and (tmp_path / "o" / "stats.json").exists()
    assert main(common + ["--method", "sjd", "--out", str(tmp_path / "p")]) == 2  # sjd takes no resampler
