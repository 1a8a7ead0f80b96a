"""Quality judges for the zoo models: caption exact match, prompt faithfulness, and a Fréchet distance
in the features of a small scene classifier.

Paper: Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium" (2017) for the Fréchet distance between Gaussian fits of features (FID); here the
features come from :class:`SceneClassifier`, trained on the scene world instead of Inception on ImageNet.

Glossary:
    exact match         the generated caption equals the scene's caption word for word
    faithfulness        the scene parser reads back from a generated image exactly the objects the
                        prompt names (cell, shape, colour; the background is not in the prompt)
    cell label          0 = empty, else 1 + colour * 3 + shape (the classifier's per-cell target)
    FD                  |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from mmspec.zoo.scenes import CELLS, COLOURS, SHAPES, Scene, parse_caption, parse_image

NUM_CELL_LABELS = 1 + len(COLOURS) * len(SHAPES)
_COLOURS = sorted(COLOURS)


def cell_labels(scene: Scene) -> list[int]:
    labels = [0] * len(CELLS)
    for o in scene.objects:
        labels[o.cell] = 1 + _COLOURS.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    return labels


class SceneClassifier(torch.nn.Module):
    """A small CNN: image [B, 3, 64, 64] in [-1, 1] -> per-cell labels [B, 9, 19]; ``features`` is its
    ``feature_dim``-wide penultimate layer (the space of the Fréchet distance)."""

    CONFIG_NAME = "scene_classifier.json"
    WEIGHTS_NAME = "model.safetensors"

    def __init__(self, feature_dim: int = 32, width: int = 16):
        super().__init__()
        self.feature_dim, self.width = feature_dim, width
        w = width
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(3, w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(3),
        )
        self.proj = torch.nn.Linear(4 * w * 9, feature_dim)
        self.head = torch.nn.Linear(feature_dim, len(CELLS) * NUM_CELL_LABELS)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).view(-1, len(CELLS), NUM_CELL_LABELS)

    def loss(self, x: torch.Tensor, scenes: Sequence[Scene]) -> torch.Tensor:
        target = torch.tensor([cell_labels(s) for s in scenes])
        return F.cross_entropy(self(x).reshape(-1, NUM_CELL_LABELS), target.reshape(-1))

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.CONFIG_NAME).write_text(json.dumps({"feature_dim": self.feature_dim, "width": self.width}))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / self.WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SceneClassifier":
        from safetensors.torch import load_file

        path = Path(path)
        model = cls(**json.loads((path / cls.CONFIG_NAME).read_text()))
        model.load_state_dict(load_file(str(path / cls.WEIGHTS_NAME)))
        return model.eval()


def images_to_tensor(images: Sequence[Image.Image], size: int = 64) -> torch.Tensor:
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of feature sets a [n, d] and b [m, d] (float64)."""
    a, b = a.double(), b.double()
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(sa)
    root_a = vec @ torch.diag(ev.clamp_min(0).sqrt()) @ vec.T
    inner = torch.linalg.eigvalsh(root_a @ sb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu + sa.trace() + sb.trace() - 2 * inner)


def prompt_faithful(image: Image.Image, prompt: str) -> bool:
    return parse_image(image).objects == parse_caption(prompt).objects


def prompt_faithfulness(images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
    """Fraction of images whose parsed scene has exactly the prompt's objects."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    return sum(prompt_faithful(im, p) for im, p in zip(images, prompts)) / len(images)


def caption_exact_match(captions: Sequence[str], scenes: Sequence[Scene]) -> float:
    if len(captions) != len(scenes) or not scenes:
        raise ValueError(f"need one caption per scene, got {len(captions)} and {len(scenes)}")
    return sum(c.strip() == s.caption() for c, s in zip(captions, scenes)) / len(scenes)
