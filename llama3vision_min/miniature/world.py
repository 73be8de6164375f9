"""The miniature world: pictures of coloured shapes, and questions about them.

A picture is 64 x 64 pixels on a random, light, nearly grey background and holds one, two or
three copies of one shape in one colour (5 shapes x 5 colours), each at its own random
position and size, never overlapping. Because all objects in a picture share their
colour and shape, every question has exactly one right answer:

================================  ==========================================
question                          answer
================================  ==========================================
``what is this?``                 ``a red circle`` / ``two red circles`` / ``three red circles``
``what colour is the shape?``     ``red``
``what shape is it?``             ``circle``
``how many shapes are there?``    ``one`` / ``two`` / ``three``
================================  ==========================================

Everything is deterministic from an integer seed (``random.Random(seed)``): the same
seed always gives the same picture, question and answer. Seeds below
``HELD_OUT_START`` are the training seeds; evaluation draws its pictures from seeds at
or above it, which training never touches.
"""

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
"""Pictures are IMAGE_SIZE x IMAGE_SIZE pixels, the vision tower's input size (no resize needed)."""

COLOURS = {  # nominal RGB of each colour; each object is drawn within +-COLOUR_JITTER of it
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 55, 195),
}
COLOUR_JITTER = 12

SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
COUNTS = ("one", "two", "three")

QUESTIONS = {
    "what": "what is this?",
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "count": "how many shapes are there?",
}
"""The four question types and their wording (the only wording the vision model is trained on)."""
QUESTION_TYPES = tuple(QUESTIONS)

HELD_OUT_START = 10_000_000
"""Training uses seeds below this; evaluation uses seeds from here on."""


@dataclass(frozen=True)
class Obj:
    """One drawn object: centre (x, y) in pixels, radius in pixels, and its exact RGB."""

    x: float
    y: float
    radius: float
    rgb: tuple


@dataclass(frozen=True)
class Scene:
    """What one picture holds: ``count`` copies of ``shape`` in ``colour`` on ``background``."""

    colour: str
    shape: str
    count: int  # 1, 2 or 3
    background: tuple  # RGB
    objects: tuple  # of Obj

    @property
    def label(self):
        """The class index 0..74 of (count, colour, shape), used to build contrastive batches."""
        return (((self.count - 1) * len(COLOURS) + list(COLOURS).index(self.colour)) * len(SHAPES)
                + SHAPES.index(self.shape))


N_CLASSES = len(COUNTS) * len(COLOURS) * len(SHAPES)


def phrase(colour, shape, count):
    """``a red circle`` / ``two red circles``: the answer to "what is this?"."""
    if count == 1:
        return f"a {colour} {shape}"
    return f"{COUNTS[count - 1]} {colour} {PLURALS[shape]}"


def answer(scene, question_type):
    """The one right answer to a question type about a scene."""
    if question_type == "what":
        return phrase(scene.colour, scene.shape, scene.count)
    if question_type == "colour":
        return scene.colour
    if question_type == "shape":
        return scene.shape
    if question_type == "count":
        return COUNTS[scene.count - 1]
    raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")


# -- drawing -------------------------------------------------------------------------------
def _jitter(rgb, rng, amount):
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _random_background(rng):
    """A light, nearly grey colour with a slight tint (never a saturated colour).

    Light only: on dark backgrounds the dark colours (blue, purple) nearly vanish, and the
    tiny vision tower then needs several times more training to tell the shapes apart.
    """
    grey = rng.randint(150, 235)
    return tuple(min(255, max(0, grey + rng.randint(-18, 18))) for _ in range(3))


RADIUS = (10, 12)
"""Radius range (pixels) of every object, whether it is alone or one of several. The same range
for both: when lone objects were larger, one big object and two small ones looked alike to the
tiny vision tower. Narrow on purpose: with radii of 9 to 14 px the tower counted partly by how
much of the picture is coloured and miscounted three small objects as two (count 97 % -> 98.6 %
with this range)."""
GAP = 6
"""Smallest distance (pixels) between the outlines of two objects' circles."""


def _place(rng, count):
    """Random non-overlapping (x, y, radius) for ``count`` objects inside the picture."""
    low, high = RADIUS
    while True:  # rejection sampling; with these sizes a layout is found in a few tries
        placed = []
        for _ in range(count):
            for _attempt in range(50):
                r = rng.uniform(low, high)
                x, y = rng.uniform(r + 1, IMAGE_SIZE - r - 2), rng.uniform(r + 1, IMAGE_SIZE - r - 2)
                if all(math.hypot(x - px, y - py) > r + pr + GAP for px, py, pr in placed):
                    placed.append((x, y, r))
                    break
        if len(placed) == count:
            return placed


def random_scene(rng, colour=None, shape=None, count=None):
    """Draw a scene's content from ``rng``; fix colour, shape or count by passing them."""
    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    count = count or rng.randint(1, 3)
    background = _random_background(rng)
    objects = tuple(Obj(x, y, r, _jitter(COLOURS[colour], rng, COLOUR_JITTER))
                    for x, y, r in _place(rng, count))
    return Scene(colour, shape, count, background, objects)


def scene(seed):
    """The scene of picture number ``seed``."""
    return random_scene(random.Random(seed))


def _outline(shape, x, y, r):
    """The polygon (or bounding box, for circles and squares) of one shape centred at (x, y)."""
    if shape == "circle":
        return [(x - r, y - r), (x + r, y + r)]
    if shape == "square":
        s = 0.85 * r  # about the same area as the circle's
        return [(x - s, y - s), (x + s, y + s)]
    if shape == "triangle":
        return [(x, y - r), (x - 0.95 * r, y + 0.8 * r), (x + 0.95 * r, y + 0.8 * r)]
    if shape == "star":
        points = []
        for k in range(10):  # five outer points and five inner ones
            radius = r if k % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
        return points
    if shape == "cross":
        # half the width of an arm (thin: with arms a third of r wide, the tiny tower took crosses for
        # squares)
        a = 0.25 * r
        return [(x - a, y - r), (x + a, y - r), (x + a, y - a), (x + r, y - a),
                (x + r, y + a), (x + a, y + a), (x + a, y + r), (x - a, y + r),
                (x - a, y + a), (x - r, y + a), (x - r, y - a), (x - a, y - a)]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene):
    """Draw a scene: an RGB ``PIL.Image`` of IMAGE_SIZE x IMAGE_SIZE."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    _draw_objects(image, scene, fill=lambda obj: obj.rgb)
    return image


def object_mask(scene):
    """Where the objects are: an IMAGE_SIZE x IMAGE_SIZE ``PIL.Image`` of mode "1", true on an object."""
    mask = Image.new("1", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_objects(mask, scene, fill=lambda obj: 1)
    return mask


def _draw_objects(image, scene, fill):
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        outline = _outline(scene.shape, obj.x, obj.y, obj.radius)
        if scene.shape == "circle":
            draw.ellipse(outline, fill=fill(obj))
        elif scene.shape == "square":
            draw.rectangle(outline, fill=fill(obj))
        else:
            draw.polygon(outline, fill=fill(obj))


def sample(seed):
    """One labelled example: ``(PIL.Image, question, answer)``, deterministic from ``seed``.

    The question type is drawn uniformly from the four types, after the scene, from the
    same random stream.
    """
    rng = random.Random(seed)
    content = random_scene(rng)
    question_type = rng.choice(QUESTION_TYPES)
    return render(content), QUESTIONS[question_type], answer(content, question_type)
