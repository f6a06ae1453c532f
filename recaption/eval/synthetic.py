"""Generated multi-object scenes with a ground truth, a short caption (main object) and a long one (every object).

The long caption is the scene's canonical description, the text the scene captioner is trained to write and the
format `recaption.demo.scenes` parses back:

    The background is <background>. A <size> <texture> <colour> <shape> is at the <position>. ...

one sentence per object, objects in reading order of their grid cell (top left … bottom right). A scene made with
`text=True` also has a short word written small (PIL's built-in bitmap font) in a cell no object takes, and one more
sentence at the end: `The word "<word>" is written at the <position>.`
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageChops, ImageDraw, ImageFont

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
TEXTURES = ("solid", "striped", "dotted")
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
POSITION_ORDER = {name: gy * 3 + gx for name, (gx, gy) in POSITIONS.items()}  # reading order of the cells
MAX_OBJECTS = 6
# Three-letter words (the bitmap font draws each 18×11 pixels, inside one cell from 56 pixels up) that are no
# attribute of the scene vocabulary, so a caption's text sentence never reads as an object.
WORDS = ("sun", "cat", "dog", "map", "key", "cup", "hat", "owl", "bee", "fox")
MIN_TEXT_SIZE = 56


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    texture: str = "solid"

    def sentence(self) -> str:
        return f"A {self.size} {self.texture} {self.colour} {self.shape} is at the {self.position}."

    def to_dict(self) -> dict[str, str]:
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "texture": self.texture,
            "position": self.position,
        }


@dataclass
class SceneText:
    word: str
    position: str

    def sentence(self) -> str:
        return f'The word "{self.word}" is written at the {self.position}.'

    def to_dict(self) -> dict[str, str]:
        return {"word": self.word, "position": self.position}


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str
    image: Image.Image = field(repr=False)
    text: SceneText | None = None

    @property
    def short_caption(self) -> str:
        main = max(self.objects, key=lambda o: SIZES[o.size])
        return f"a {main.colour} {main.shape}"

    @property
    def long_caption(self) -> str:
        ordered = sorted(self.objects, key=lambda o: POSITION_ORDER[o.position])
        text = [self.text.sentence()] if self.text else []
        return " ".join([f"The background is {self.background}.", *(o.sentence() for o in ordered), *text])

    def truth(self) -> dict:
        """The ground truth as plain data (JSON-able): background and objects in reading order, and `text`
        {word, position} when the scene has text."""
        ordered = sorted(self.objects, key=lambda o: POSITION_ORDER[o.position])
        truth = {"background": self.background, "objects": [o.to_dict() for o in ordered]}
        return truth | ({"text": self.text.to_dict()} if self.text else {})

    def jpeg(self, quality: int = 90) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


def make_scene(
    seed: int, size: int = 96, min_objects: int = 1, max_objects: int = 4, textures: bool = True, text: bool = False
) -> Scene:
    """One deterministic scene: distinct positions, the first object drawn large so a main object exists.

    `textures=False` draws every object solid (the scene world before textures existed). `text=True` adds a word
    in a free cell; its random draws come after the objects', so the objects, background and every pixel outside
    the word's box are those of the same seed without text."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got {min_objects}, {max_objects}")
    if text and size < MIN_TEXT_SIZE:
        raise ValueError(f"scenes with text need size >= {MIN_TEXT_SIZE} (the word must fit in its cell), got {size}")
    rng = random.Random(seed)
    n = rng.randint(min_objects, max_objects)
    background = rng.choice(sorted(BACKGROUNDS))
    positions = rng.sample(sorted(POSITIONS), n)
    objects = []
    for i, pos in enumerate(positions):
        colour = rng.choice([c for c in sorted(COLOURS) if c != background])
        shape = rng.choice(SHAPES)
        texture = rng.choice(TEXTURES) if textures else "solid"
        objects.append(SceneObject(shape, colour, "large" if i == 0 else "small", pos, texture))
    image = draw_scene(objects, background, size)
    written = None
    if text:
        free = [p for p in sorted(POSITIONS) if p not in positions]  # at most 6 objects in 9 cells: never empty
        written = SceneText(rng.choice(WORDS), rng.choice(free))
        draw_text(image, written, background)
    return Scene(objects, background, image, written)


def draw_scene(objects: list[SceneObject], background: str, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    cell = size / 3
    for obj in objects:
        gx, gy = POSITIONS[obj.position]
        cx, cy = (gx + 0.5) * cell, (gy + 0.5) * cell
        r = SIZES[obj.size] * size / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[obj.colour]
        mask = Image.new("L", img.size, 0)  # the shape's pixels, so a texture stays inside its shape
        shape = ImageDraw.Draw(mask)
        if obj.shape == "circle":
            shape.ellipse(box, fill=255)
        elif obj.shape == "square":
            shape.rectangle(box, fill=255)
        else:
            shape.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=255)
        img.paste(fill, mask=mask)
        if obj.texture != "solid":
            img.paste(_contrast(fill), mask=_texture_mask(mask, obj.texture, size))
    return img


def text_box(text: SceneText, size: int) -> tuple[int, int, int, int]:
    """The pixel box (left, top, right, bottom; right and bottom exclusive) the word is drawn in: centred in its cell."""
    left, top, right, bottom = _FONT.getbbox(text.word)
    gx, gy = POSITIONS[text.position]
    cell = size / 3
    x = round((gx + 0.5) * cell - (right - left) / 2)
    y = round((gy + 0.5) * cell - (bottom - top) / 2)
    return x, y, x + right - left, y + bottom - top


def draw_text(image: Image.Image, text: SceneText, background: str) -> None:
    """Writes the word in place, in black or white, whichever stands out from the background."""
    left, top, _, _ = _FONT.getbbox(text.word)
    x, y, _, _ = text_box(text, image.width)
    ImageDraw.Draw(image).text((x - left, y - top), text.word, fill=_contrast(BACKGROUNDS[background]), font=_FONT)


_FONT = ImageFont.load_default_imagefont()  # the bitmap font inside Pillow: no font file, same pixels everywhere


def _contrast(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones: the colour of a texture's stripes or dots."""
    return (0, 0, 0) if sum(rgb) > 360 else (255, 255, 255)


def _texture_mask(shape: Image.Image, texture: str, size: int) -> Image.Image:
    """The shape's mask cut down to horizontal stripes or a grid of dots; the period scales with the image."""
    period = max(3, size // 24)
    pattern = Image.new("L", shape.size, 0)
    draw = ImageDraw.Draw(pattern)
    if texture == "striped":
        for y in range(0, size, 2 * period):
            draw.rectangle((0, y, size, y + period - 1), fill=255)
    elif texture == "dotted":
        for y in range(period // 2, size, 2 * period):
            for x in range(period // 2, size, 2 * period):
                draw.rectangle((x, y, x + period - 1, y + period - 1), fill=255)
    else:
        raise ValueError(f"unknown texture {texture!r}; choose one of {', '.join(TEXTURES)}")
    return ImageChops.multiply(shape, pattern)  # 255 only where both are 255
