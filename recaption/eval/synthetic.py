"""Generated multi-object scenes with a ground truth, a short caption (main object) and a long one (every object)."""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.16, "large": 0.32}
# A 3×3 grid of positions keeps objects apart and makes "where" part of the ground truth.
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "centre": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
BACKGROUNDS = {"grey": (128, 128, 128), "beige": (225, 215, 190), "dark blue": (25, 30, 70)}


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def sentence(self) -> str:
        return f"A {self.size} {self.colour} {self.shape} is at the {self.position}."


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    image: Image.Image = field(repr=False)

    @property
    def short_caption(self) -> str:
        main = max(self.objects, key=lambda o: SIZES[o.size])
        return f"a {main.colour} {main.shape}"

    @property
    def long_caption(self) -> str:
        return " ".join([f"The background is {self.background}.", *(o.sentence() for o in self.objects)])

    def jpeg(self, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def make_scene(seed: int, size: int = 96, min_objects: int = 1, max_objects: int = 4) -> Scene:
    """One deterministic scene: distinct positions, the first object drawn large so a main object exists."""
    rng = random.Random(seed)
    n = rng.randint(min_objects, max_objects)
    background = rng.choice(sorted(BACKGROUNDS))
    positions = rng.sample(sorted(POSITIONS), n)
    objects = []
    for i, pos in enumerate(positions):
        colour = rng.choice([c for c in sorted(COLOURS) if c != background])
        objects.append(SceneObject(rng.choice(SHAPES), colour, "large" if i == 0 else "small", pos))
    return Scene(objects, background, draw_scene(objects, background, size))


def draw_scene(objects: list[SceneObject], background: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    cell = size / 3
    for obj in objects:
        gx, gy = POSITIONS[obj.position]
        cx, cy = (gx + 0.5) * cell, (gy + 0.5) * cell
        r = SIZES[obj.size] * size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif obj.shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img
