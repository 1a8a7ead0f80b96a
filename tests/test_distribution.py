"""mmspec.zoo.distribution: attribute distributions of scene images, stratified two-sample tests, codebook TV,
precision and recall."""

import random

import pytest
import torch

from mmspec.zoo.distribution import (ATTRIBUTES, DistributionError, attribute_test, attributes, codebook_tv, compare,
                                     precision_recall, sample)
from mmspec.zoo.scenes import Scene, SceneObject, render


def _images(backgrounds, prompt="a red square at the top left", objects=None):
    objs = objects or (SceneObject(0, "square", "red"),)
    return [render(Scene(objs, bg), 48) for bg in backgrounds], [prompt] * len(backgrounds)


def test_attributes_read_a_rendered_scene():
    img = render(Scene((SceneObject(0, "square", "red"), SceneObject(8, "circle", "blue")), "grey"), 48)
    a = attributes(img)
    assert a["background"] == ["grey"] and a["objects"] == ["2"]
    assert sorted(a["colour"]) == ["blue", "red"] and sorted(a["shape"]) == ["circle", "square"]
    assert sorted(a["cell"]) == ["bottom right", "top left"] and len(a["size"]) == 1
    assert set(a) == set(ATTRIBUTES)


def test_the_stratified_test_equals_scipy_on_one_prompt_and_sums_over_prompts():
    from scipy.stats import chi2, chi2_contingency

    ref = sample(*_images(["white"] * 30 + ["grey"] * 10))
    oth = sample(*_images(["white"] * 12 + ["grey"] * 28))
    t = attribute_test(ref, oth, "background")
    want = chi2_contingency([[30, 10], [12, 28]], correction=False)
    assert t.statistic == pytest.approx(want.statistic) and t.dof == 1 and t.p_value == pytest.approx(want.pvalue)
    assert t.tv == pytest.approx(0.45) and not t.within()
    # two prompts: statistics and degrees of freedom add up
    im_a, p_a = _images(["white"] * 30 + ["grey"] * 10)
    im_b, p_b = _images(["cream"] * 20 + ["grey"] * 20, prompt="a blue circle at the center",
                        objects=(SceneObject(4, "circle", "blue"),))
    im_c, p_c = _images(["cream"] * 25 + ["grey"] * 15, prompt="a blue circle at the center",
                        objects=(SceneObject(4, "circle", "blue"),))
    im_d, p_d = _images(["white"] * 12 + ["grey"] * 28)
    two = attribute_test(sample(im_a + im_b, p_a + p_b), sample(im_d + im_c, p_d + p_c), "background")
    second = chi2_contingency([[20, 20], [25, 15]], correction=False)
    assert two.dof == 2
    assert two.statistic == pytest.approx(want.statistic + second.statistic)
    assert two.p_value == pytest.approx(chi2.sf(want.statistic + second.statistic, 2))


def test_same_distribution_is_within_and_a_moved_background_is_not():
    rng = random.Random(0)
    bgs = ["white", "grey", "cream"]
    ref = sample(*_images([rng.choice(bgs) for _ in range(90)]))
    same = sample(*_images([rng.choice(bgs) for _ in range(90)]))
    moved = sample(*_images(["cream"] * 70 + ["white"] * 20))
    assert compare(ref, same).within_floor()
    c = compare(ref, moved)
    assert not c.within_floor() and c.failing() == ["background"]
    assert "NOT within" in c.verdict() and "background" in c.verdict()
    assert "within plain AR's noise floor" in compare(ref, same).verdict()


def test_codebook_tv_and_precision_recall_table_cases():
    a = torch.tensor([0, 0, 1, 1])
    assert codebook_tv(a, a) == 0.0
    assert codebook_tv(a, torch.tensor([2, 2, 2, 2])) == 1.0
    assert codebook_tv(a, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.25)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)
    # a method that covers only half of the reference: full precision, recall about half
    half = x[x[:, 0] > 0]
    p, r = precision_recall(x, half)
    assert p == 1.0 and 0.3 < r < 0.8


def test_bad_samples_are_named_errors():
    with pytest.raises(DistributionError, match="need one prompt per image"):
        sample([], [])
    im, p = _images(["white"] * 4)
    with pytest.raises(DistributionError, match="need one prompt per image"):
        sample(im, p[:2])
    other = sample(*_images(["white"] * 4, prompt="a blue circle at the center"))
    with pytest.raises(DistributionError, match="prompt 'a red square at the top left' is in the reference"):
        attribute_test(sample(im, p), other, "background")
    with pytest.raises(DistributionError, match="unknown attribute 'hue'"):
        attribute_test(sample(im, p), sample(im, p), "hue")
    with pytest.raises(DistributionError, match="more than k = 3 images"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
