"""Distribution-level quality of generated scene images against plain AR: does a method change *which* images
come out, not only how good they look on average?

Papers: Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models" (NeurIPS
2019) for precision / recall; the two-sample test is Pearson's chi-square test of homogeneity
(:func:`scipy.stats.chi2_contingency`), stratified by prompt.

Glossary:
    attribute       what the scene parser (:func:`~mmspec.zoo.scenes.parse_image`) reads from an image:
                    ``background`` (one per image), ``objects`` (the number found, 0-3 and "4+"),
                    ``colour`` / ``shape`` / ``cell`` (one per object found), ``size`` (the share of
                    non-background pixels, in :data:`SIZE_BINS`)
    sample          images with their prompts; every prompt of the reference appears in the compared sample
    stratified test per prompt, a contingency table (2 samples x the attribute's values seen in either); the
                    chi-square statistics and degrees of freedom are summed over prompts (independent strata)
                    and the p-value read from the sum: a method may not move a prompt's distribution even where
                    the pooled marginals happen to agree
    TV              total variation between the two samples' attribute frequencies, averaged over prompts
                    (weighted by the images of each)
    floor           the same numbers for plain AR against plain AR with other seeds: how far two AR samples
                    of this size differ by chance
    within floor    an attribute is within the floor when its test does not reject at ``alpha`` (default 0.01
                    per attribute, about 0.06 for the family of six); a method is within the floor only if every
                    attribute is
    codebook TV     total variation between the two samples' histograms of image-token ids
    precision       the share of the method's images whose classifier features fall inside the reference's
                    k-nearest-neighbour balls (k = 3): fidelity
    recall          the share of the reference's images inside the method's balls: diversity
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image

from .scenes import BACKGROUNDS, CELLS, Scene, parse_image

ATTRIBUTES = ("background", "objects", "colour", "shape", "cell", "size")
#: upper edges of the size bins (share of non-background pixels)
SIZE_BINS = (0.05, 0.10, 0.15, 0.20, 0.30, 1.01)
ALPHA = 0.01


class DistributionError(ValueError):
    """Samples that cannot be compared (no images, a prompt missing from one side, mismatched lengths)."""


def _size_bin(share: float) -> str:
    for edge in SIZE_BINS:
        if share < edge:
            return f"<{edge:g}"
    return f"<{SIZE_BINS[-1]:g}"


def foreground_share(image: Image.Image, background: str) -> float:
    """Share of pixels farther than 30 (RGB distance) from the parsed background colour."""
    import numpy as np

    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3))  # [N, 3]
    bg = torch.tensor(BACKGROUNDS[background], dtype=torch.float32)
    return float(((x - bg).norm(dim=1) > 30).float().mean())


def attributes(image: Image.Image, scene: Scene | None = None) -> dict[str, list[str]]:
    """Every attribute's values in one image (``scene``: its parse, when already known)."""
    scene = scene if scene is not None else parse_image(image)
    n = len(scene.objects)
    return {"background": [scene.background], "objects": [str(n) if n < 4 else "4+"],
            "colour": [o.colour for o in scene.objects], "shape": [o.shape for o in scene.objects],
            "cell": [CELLS[o.cell] for o in scene.objects],
            "size": [_size_bin(foreground_share(image, scene.background))]}


@dataclass
class Sample:
    """Attribute values per prompt, token ids and classifier features of a set of generated images."""

    prompts: list[str]
    values: dict[str, dict[str, Counter]]  # attribute -> prompt -> Counter of values
    tokens: torch.Tensor | None = None  # long [N, H, W]
    features: torch.Tensor | None = None  # float [N, d]
    seconds: float = 0.0  # generation time (generate_sample)
    target_forwards: int = 0  # the target's forwards over all images (generate_sample)

    @property
    def size(self) -> int:
        return len(self.prompts)


def sample(images: Sequence[Image.Image], prompts: Sequence[str], tokens: torch.Tensor | None = None,
           classifier: torch.nn.Module | None = None) -> Sample:
    """Parse ``images`` (one prompt each) into a :class:`Sample`; ``classifier``: a
    :class:`~mmspec.zoo.quality.SceneClassifier` for precision / recall features."""
    if not images or len(images) != len(prompts):
        raise DistributionError(f"need one prompt per image and at least one image, got {len(images)} images and "
                                f"{len(prompts)} prompts")
    values: dict[str, dict[str, Counter]] = {a: defaultdict(Counter) for a in ATTRIBUTES}
    for im, p in zip(images, prompts):
        for a, vs in attributes(im).items():
            values[a][p].update(vs)
    feats = None
    if classifier is not None:
        from .quality import images_to_tensor

        with torch.no_grad():
            feats = torch.cat([classifier.features(images_to_tensor(images[i:i + 64]))
                               for i in range(0, len(images), 64)])
    return Sample(list(prompts), {a: dict(v) for a, v in values.items()}, tokens, feats)


@dataclass(frozen=True)
class AttributeTest:
    attribute: str
    tv: float
    statistic: float
    dof: int
    p_value: float

    def within(self, alpha: float = ALPHA) -> bool:
        return self.p_value >= alpha


def _tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    if not na or not nb:
        return 0.0
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def attribute_test(reference: Sample, other: Sample, attribute: str) -> AttributeTest:
    """The stratified two-sample test and mean TV of one attribute (see the glossary)."""
    from scipy.stats import chi2, chi2_contingency

    if attribute not in ATTRIBUTES:
        raise DistributionError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
    ref, oth = reference.values[attribute], other.values[attribute]
    missing = sorted(set(ref) - set(oth))
    if missing:
        raise DistributionError(f"prompt {missing[0]!r} is in the reference sample but not in the other")
    stat, dof, tv_sum, w_sum = 0.0, 0, 0.0, 0.0
    for p, a in ref.items():
        b = oth[p]
        keys = sorted(set(a) | set(b))
        w = sum(a.values()) + sum(b.values())
        tv_sum += _tv(a, b) * w
        w_sum += w
        if len(keys) < 2 or not sum(a.values()) or not sum(b.values()):
            continue  # one value on both sides (or an empty side): no information on this prompt
        res = chi2_contingency([[a[k] for k in keys], [b[k] for k in keys]], correction=False)
        stat += float(res.statistic)
        dof += int(res.dof)
    p_value = float(chi2.sf(stat, dof)) if dof else 1.0
    return AttributeTest(attribute, tv_sum / max(w_sum, 1.0), stat, dof, p_value)


def codebook_tv(a: torch.Tensor, b: torch.Tensor, vocab: int | None = None) -> float:
    """Total variation between the image-token histograms of two token sets (long, any shape)."""
    v = vocab or int(max(a.max(), b.max())) + 1
    ha = torch.bincount(a.flatten(), minlength=v).double()
    hb = torch.bincount(b.flatten(), minlength=v).double()
    return float(0.5 * (ha / ha.sum() - hb / hb.sum()).abs().sum())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s improved precision and recall of features ``fake`` [m, d] against ``real`` [n, d]:
    each set's manifold is the union of balls reaching every point's k-th nearest neighbour in its own set."""
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise DistributionError(f"precision / recall need more than k = {k} images on each side")
    real, fake = real.double(), fake.double()

    def radii(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # the point itself is its own nearest neighbour

    r_real, r_fake = radii(real), radii(fake)
    precision = (torch.cdist(fake, real) <= r_real.unsqueeze(0)).any(dim=1).double().mean()
    recall = (torch.cdist(real, fake) <= r_fake.unsqueeze(0)).any(dim=1).double().mean()
    return float(precision), float(recall)


@dataclass
class Comparison:
    """A method's sample against the reference (plain AR), beside the floor (AR against AR, other seeds)."""

    tests: dict[str, AttributeTest]
    codebook_tv: float | None = None
    precision: float | None = None
    recall: float | None = None
    floor: "Comparison | None" = None
    alpha: float = ALPHA
    extra: dict = field(default_factory=dict)

    def within_floor(self) -> bool:
        return all(t.within(self.alpha) for t in self.tests.values())

    def failing(self) -> list[str]:
        return [a for a, t in self.tests.items() if not t.within(self.alpha)]

    #: the column names of :meth:`table_cells`
    TABLE_HEADERS = ("within floor", *ATTRIBUTES, "codebook TV", "precision / recall")

    def table_cells(self) -> list[str]:
        """Markdown cells: within the floor, each attribute's "TV (p p-value)", codebook TV, precision / recall."""
        return ["yes" if self.within_floor() else "**no**",
                *(f"{t.tv:.2f} (p {t.p_value:.2g})" for t in self.tests.values()),
                "–" if self.codebook_tv is None else f"{self.codebook_tv:.3f}",
                "–" if self.precision is None else f"{self.precision:.2f} / {self.recall:.2f}"]

    def verdict(self) -> str:
        """One line for a user: within AR's noise floor on every attribute, or which attributes moved."""
        if self.within_floor():
            return f"attribute distributions within plain AR's noise floor ({len(self.tests)} attributes, " \
                   f"two-sample p >= {self.alpha:g})"
        worst = min(self.tests.values(), key=lambda t: t.p_value)
        return f"attribute distributions NOT within plain AR's noise floor: {', '.join(self.failing())} moved " \
               f"({worst.attribute}: TV {worst.tv:.2f}, p {worst.p_value:.1g})"


def compare(reference: Sample, other: Sample, *, alpha: float = ALPHA, vocab: int | None = None,
            floor: Comparison | None = None) -> Comparison:
    """Every attribute's stratified test, codebook TV and precision / recall of ``other`` against ``reference``."""
    tests = {a: attribute_test(reference, other, a) for a in ATTRIBUTES}
    cb = (codebook_tv(reference.tokens, other.tokens, vocab)
          if reference.tokens is not None and other.tokens is not None else None)
    prec = rec = None
    if reference.features is not None and other.features is not None:
        prec, rec = precision_recall(reference.features, other.features)
    return Comparison(tests, cb, prec, rec, floor, alpha)


def distribution_prompts(num_prompts: int = 4) -> list[str]:
    """Held-out scene captions (the benchmark's and the test's prompts): the first ``num_prompts``."""
    from .data import heldout_scenes

    return [s.caption() for s in heldout_scenes(max(num_prompts, 1))[:num_prompts]]


def generate_sample(models, prompts: Sequence[str], images_per_prompt: int, *, seed_offset: int = 0,
                    method: str = "ar", batch: int = 48, **kw) -> Sample:
    """``images_per_prompt`` images of each prompt with ``method`` (the zoo's sampling settings; image i of a
    prompt has seed ``seed_offset + i``, so two methods with the same offset share seeds), parsed."""
    from .evaluate import IMAGE_SAMPLING

    from mmspec.image_gen import generate

    images, tokens, conds = [], [], []
    seconds, forwards = 0.0, 0
    for p in prompts:
        for s in range(0, images_per_prompt, batch):
            seeds = list(range(seed_offset + s, seed_offset + min(s + batch, images_per_prompt)))
            t0 = time.perf_counter()
            out = generate(models.target, models.tokenizer, condition=[p] * len(seeds), seed=seeds, method=method,
                           **{**IMAGE_SAMPLING, **kw})
            seconds += time.perf_counter() - t0
            forwards += int(out.stats.target_forwards)
            images += out.images
            tokens.append(out.tokens)
            conds += [p] * len(seeds)
    out = sample(images, conds, torch.cat(tokens), models.classifier)
    out.seconds, out.target_forwards = seconds, forwards
    return out


__all__ = ["ALPHA", "ATTRIBUTES", "AttributeTest", "Comparison", "DistributionError", "Sample", "attribute_test",
           "attributes", "codebook_tv", "compare", "distribution_prompts", "foreground_share", "generate_sample", "precision_recall", "sample"]
