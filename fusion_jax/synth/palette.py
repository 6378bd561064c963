"""The vocabulary scenes are drawn from: colours, shapes, backgrounds, sizes, words (``easy`` or ``full``).

Dict order matters: samplers draw by position, so reordering an entry changes every set.
"""
from __future__ import annotations

import dataclasses

# Well separated colours. Names are the answers; RGB is the rendered value (before jitter).
COLORS_FULL = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30), "green": (35, 160, 55),
               "blue": (35, 75, 215), "purple": (135, 55, 185), "pink": (245, 120, 185), "brown": (125, 75, 35),
               "black": (20, 20, 20), "white": (248, 248, 248), "gray": (128, 128, 128)}
COLORS_EASY = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 225), "yellow": (240, 220, 20),
               "purple": (150, 40, 200), "black": (15, 15, 15)}
SHAPES_FULL = ("circle", "square", "triangle", "star", "hexagon", "cross")
SHAPES_EASY = ("circle", "square", "triangle")

# Backgrounds: name -> RGB. Names appear in captions.
BACKGROUNDS_FULL = {"white": (250, 250, 250), "light gray": (215, 215, 215), "beige": (235, 222, 195),
                    "light blue": (200, 222, 240), "pale green": (210, 235, 205), "pale yellow": (248, 243, 200),
                    "dark gray": (70, 70, 75), "navy": (30, 40, 80)}
BACKGROUNDS_EASY = {"white": (250, 250, 250), "light gray": (222, 222, 222), "beige": (238, 228, 205)}
BACKGROUND_STYLES_FULL = ("solid", "gradient", "stripes", "checker")
BACKGROUND_STYLES_EASY = ("solid",)

# Size classes: name -> (min, max) radius as a fraction of the image side.
SIZES_FULL = {"small": (0.055, 0.07), "medium": (0.085, 0.105), "large": (0.125, 0.15)}
SIZES_EASY = {"large": (0.15, 0.18)}

WORDS_FULL = (
    "CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "BOOK", "FISH", "BIRD", "LAMP", "CAKE", "SHIP",
    "OPEN", "STOP", "EXIT", "SALE", "CAFE", "HOTEL", "TAXI", "BANK", "PARK", "ZOO", "MILK",
    "RAIN", "SNOW", "WIND", "FIRE", "GOLD", "RICE", "TEA", "JAZZ", "ROCK", "BLUE", "KING",
    "Hello", "Music", "Pizza", "River", "Garden", "Market", "Coffee", "Window", "Orange",
    "Planet", "Silver", "Ticket", "Museum", "Bakery", "Forest", "Castle", "2024", "42", "77",
)
WORDS_EASY = ("CAT", "DOG", "SUN", "BOX", "CAR", "HAT", "CUP", "BUS", "PEN", "KEY", "MAP", "EGG")


@dataclasses.dataclass(frozen=True)
class Palette:
    """The vocabulary a scene is drawn from (``easy`` or ``full``)."""

    name: str
    colors: dict
    shapes: tuple
    backgrounds: dict
    background_styles: tuple
    sizes: dict
    words: tuple
    max_objects: int
    max_count: int
    rotate: bool
    color_jitter: int
    noise_sigma: tuple  # (min, max) gaussian noise std in 0..255 units
    outline_prob: float
    text_height: tuple  # text box height as a fraction of the side
    extra_text_prob: float  # probability of a (distractor) text item in non-text scenes


EASY = Palette(
    name="easy", colors=COLORS_EASY, shapes=SHAPES_EASY, backgrounds=BACKGROUNDS_EASY,
    background_styles=BACKGROUND_STYLES_EASY, sizes=SIZES_EASY, words=WORDS_EASY,
    max_objects=4, max_count=4, rotate=False, color_jitter=0, noise_sigma=(0.0, 2.0),
    outline_prob=0.0, text_height=(0.26, 0.32), extra_text_prob=0.0,
)
FULL = Palette(
    name="full", colors=COLORS_FULL, shapes=SHAPES_FULL, backgrounds=BACKGROUNDS_FULL,
    background_styles=BACKGROUND_STYLES_FULL, sizes=SIZES_FULL, words=WORDS_FULL,
    max_objects=8, max_count=7, rotate=True, color_jitter=12, noise_sigma=(1.0, 5.0),
    outline_prob=0.25, text_height=(0.08, 0.16), extra_text_prob=0.2,
)
PALETTES = {"easy": EASY, "full": FULL}


def get_palette(difficulty: str | Palette) -> Palette:
    if isinstance(difficulty, Palette):
        return difficulty
    try:
        return PALETTES[difficulty]
    except KeyError:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {sorted(PALETTES)}") from None
