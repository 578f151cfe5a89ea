"""The embedded task's images and grounding rows: coloured shapes on a 3x3 grid, deterministic by seed.

Grounding split (``make_split``): "Find the red circle." answered by ``[{"bbox_2d": [x1, y1,
x2, y2]}]`` in pixels, or ``[]`` when no such shape is drawn (the non-object case). The probe
split (count / colour questions about the same kind of images) is in ``probe``. Every row is
generated from its own RNG seeded by (split, seed, index).
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ...data.rows import Row

CELL = 28
GRID = 3
SIZE = CELL * GRID
INSET = 4
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
PROBLEM_TEMPLATE = "Find the {colour} {shape}. Think in <think></think>, then answer its bbox_2d in <answer></answer>, or [] if absent."

_PAIRS = [(colour, shape) for colour in COLOURS for shape in SHAPES]

Obj = tuple[str, str, int, int]  # (colour, shape, grid row, grid column), 0-based


def cell_box(r: int, c: int) -> list[int]:
    """The gold ``[x1, y1, x2, y2]`` of a shape in grid cell (r, c): the cell inset by 4 px.

    x2/y2 are pixel edges (exclusive), so the shape covers pixels x1..x2-1, y1..y2-1.
    """
    return [CELL * c + INSET, CELL * r + INSET, CELL * (c + 1) - INSET, CELL * (r + 1) - INSET]


def cell_tint(r: int, c: int) -> tuple[int, int, int]:
    """The background of cell (r, c): ``(255 - 110 r, 255 - 110 c, 128)``.

    The tint puts each cell's identity into its pixels: red encodes the row, green the
    column. Qwen2.5-VL's vision tower has no absolute position embedding and the LM sees
    image tokens only through relative mRoPE offsets, so a tiny model trained for minutes
    cannot read *where* a shape is from positions alone. The tint must be strong: with
    steps of 20 the warm start still grounded at chance after 800 steps, with 110 it
    reads row and column within a few hundred (the merger's RMSNorm keeps only the
    direction of a patch's features, and a faint tint barely turns it). Blue is fixed at
    128 so no background matches a shape colour (those have blue 0 or 255).
    """
    return (255 - 110 * r, 255 - 110 * c, 128)


def render(objects: list[Obj]) -> Image.Image:
    """Draw the shapes on the tinted grid, each touching all four edges of its ``cell_box``."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    for r in range(GRID):
        for c in range(GRID):
            draw.rectangle((CELL * c, CELL * r, CELL * (c + 1) - 1, CELL * (r + 1) - 1), fill=cell_tint(r, c))
    for colour, shape, r, c in objects:
        x1, y1, x2, y2 = cell_box(r, c)
        x2, y2 = x2 - 1, y2 - 1  # PIL's boxes include their last pixel
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x1, y1, x2, y2), fill=fill)
        elif shape == "square":
            draw.rectangle((x1, y1, x2, y2), fill=fill)
        else:
            draw.polygon([((x1 + x2) / 2, y1), (x1, y2), (x2, y2)], fill=fill)
    return image


def make_split(n: int, seed: int, absent_ratio: float) -> list[Row]:
    """``n`` grounding rows; exactly ``round(n * absent_ratio)`` of them ask for an absent shape."""
    if n < 0 or not 0.0 <= absent_ratio <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= absent_ratio <= 1, got n={n}, absent_ratio={absent_ratio}")
    absent = set(random.Random(f"shapes:{seed}").sample(range(n), round(n * absent_ratio)))
    return [_grounding_row(seed, i, i in absent) for i in range(n)]


def _grounding_row(seed: int, i: int, absent: bool) -> Row:
    rng = random.Random(f"shapes:{seed}:{i}")
    objects = scene(rng)
    if absent:
        drawn = {(colour, shape) for colour, shape, _, _ in objects}
        colour, shape = rng.choice([pair for pair in _PAIRS if pair not in drawn])
        cell, solution = None, []
    else:
        colour, shape, r, c = rng.choice(objects)
        cell, solution = (r, c), [{"bbox_2d": cell_box(r, c)}]
    meta = {"absent": absent, "colour": colour, "shape": shape, "cell": cell, "objects": objects}
    problem = PROBLEM_TEMPLATE.format(colour=colour, shape=shape)
    return Row(f"shapes-{seed}-{i}", render(objects), problem, solution, meta)


def think_trace(row: Row) -> str:
    """A short reasoning trace for a grounding row (1-based row/column), for warm-start targets."""
    m = row.meta
    if m["absent"]:
        return f"<think>There is no {m['colour']} {m['shape']}.</think>"
    r, c = m["cell"]
    return f"<think>The {m['colour']} {m['shape']} is at row {r + 1}, column {c + 1}.</think>"


def scene(rng: random.Random) -> list[Obj]:
    """1-3 shapes in distinct cells with distinct (colour, shape) pairs."""
    k = rng.randint(1, 3)
    cells = rng.sample(range(GRID * GRID), k)
    return [(colour, shape, *divmod(cell, GRID)) for (colour, shape), cell in zip(rng.sample(_PAIRS, k), cells)]
