"""A procedural scene world: flat-coloured shapes on a coarse grid, with captions that describe them fully.

Glossary:
    scene      1-3 objects, each a (shape, colour, cell) with distinct cells, on a background colour
    cell       one of the 3x3 grid positions ("top left" ... "bottom right")
    caption    "a red circle at the top left and a blue square at the bottom right": objects in raster
               order of their cells; the background is not mentioned
    parser     reads a scene back from a caption (exact) or an image (exact on rendered scenes; the
               judge of prompt faithfulness for generated images: majority colour and fill ratio)

The world is the project's own data: deterministic given a seed, no downloads.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
    "yellow": (235, 205, 30), "purple": (150, 60, 190), "orange": (245, 140, 20),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (200, 200, 200), "cream": (240, 230, 200)}
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# fill ratio of a shape inside its bounding square (rendered without antialiasing)
_FILL = {"square": 1.0, "circle": 0.785, "triangle": 0.5}


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: int  # 0..8, raster order
    shape: str
    colour: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # sorted by cell
    background: str = "white"

    def caption(self) -> str:
        parts = [f"a {o.colour} {o.shape} at the {CELLS[o.cell]}" for o in self.objects]
        return " and ".join(parts)


def sample_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample(range(len(CELLS)), n))
    objs = tuple(SceneObject(c, rng.choice(SHAPES), rng.choice(sorted(COLOURS))) for c in cells)
    return Scene(objs, rng.choice(sorted(BACKGROUNDS)))


def scenes(n: int, seed: int = 0, max_objects: int = 3) -> list[Scene]:
    """``n`` scenes, deterministic given ``seed``."""
    rng = random.Random(seed)
    return [sample_scene(rng, max_objects) for _ in range(n)]


def _cell_box(cell: int, size: int) -> tuple[int, int, int, int]:
    step = size / 3
    r, c = divmod(cell, 3)
    margin = step * 0.15
    return (round(c * step + margin), round(r * step + margin), round((c + 1) * step - margin) - 1,
            round((r + 1) * step - margin) - 1)


def render(scene: Scene, size: int = 48) -> Image.Image:
    """The scene as an RGB image (no antialiasing, so colours are exact)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x0, y0, x1, y1 = _cell_box(o.cell, size)
        colour = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    return img


_CAPTION_PART = re.compile(r"a (\w+) (\w+) at the ([a-z ]+?)$")


def parse_caption(text: str, background: str = "white") -> Scene:
    """Inverse of :meth:`Scene.caption` (raises ValueError on text outside the world)."""
    objs = []
    for part in text.strip().lower().split(" and "):
        m = _CAPTION_PART.match(part.strip())
        if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in CELLS:
            raise ValueError(f"not a scene caption: {part!r}")
        objs.append(SceneObject(CELLS.index(m.group(3)), m.group(2), m.group(1)))
    if len({o.cell for o in objs}) != len(objs):
        raise ValueError(f"two objects in one cell: {text!r}")
    return Scene(tuple(sorted(objs)), background)


def _nearest(rgb, table: dict) -> tuple[str, float]:
    name = min(table, key=lambda k: sum((a - b) ** 2 for a, b in zip(rgb, table[k])))
    return name, sum((a - b) ** 2 for a, b in zip(rgb, table[name])) ** 0.5


def parse_image(img: Image.Image, min_fill: float = 0.2) -> Scene:
    """Read the scene back from an image: per cell, the dominant non-background colour and the fill
    ratio of its pixels inside the cell's box decide colour and shape."""
    img = img.convert("RGB")
    size = img.width
    px = img.load()
    # background: the nearest background colour to the image border's median
    border = [px[x, 0] for x in range(size)] + [px[0, y] for y in range(size)]
    border.sort(key=sum)
    background, _ = _nearest(border[len(border) // 2], BACKGROUNDS)
    objs = []
    for cell in range(len(CELLS)):
        x0, y0, x1, y1 = _cell_box(cell, size)
        counts: dict[str, int] = {}
        total = (x1 - x0 + 1) * (y1 - y0 + 1)
        for y in range(y0, y1 + 1):
            for x in range(x0, x1 + 1):
                name, dist = _nearest(px[x, y], {**COLOURS, **{"_bg": BACKGROUNDS[background]}})
                if name != "_bg":
                    counts[name] = counts.get(name, 0) + 1
        if not counts:
            continue
        colour, n = max(counts.items(), key=lambda kv: kv[1])
        fill = n / total
        if fill < min_fill:
            continue
        shape = min(_FILL, key=lambda s: abs(_FILL[s] - fill))
        objs.append(SceneObject(cell, shape, colour))
    return Scene(tuple(objs), background)
