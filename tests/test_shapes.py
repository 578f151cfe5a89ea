"""The embedded shapes task: determinism, pixel-true boxes, absent queries, export round trip."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from visurf_engine.data import load_rows, write_dataset
from visurf_engine.tasks.shapes import make_probe_split, make_split, render, think_trace
from visurf_engine.tasks.shapes.generator import COLOURS, cell_tint

RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def pixels(row) -> np.ndarray:
    return np.asarray(row.image)


def drawn_box(image: np.ndarray, r: int, c: int) -> tuple[list[int], np.ndarray]:
    """The tight [x1, y1, x2 (exclusive), y2 (exclusive)] box of non-background pixels in cell (r, c)."""
    cell = image[28 * r:28 * r + 28, 28 * c:28 * c + 28]
    mask = (cell != cell_tint(r, c)).any(axis=-1)
    ys, xs = np.nonzero(mask)
    return [28 * c + xs.min(), 28 * r + ys.min(), 28 * c + xs.max() + 1, 28 * r + ys.max() + 1], cell[mask]


def test_same_seed_same_rows_other_seed_differs():
    a, b, other = make_split(40, 7, 0.3), make_split(40, 7, 0.3), make_split(40, 8, 0.3)
    for x, y in zip(a, b):
        assert (x.id, x.problem, x.solution, x.meta) == (y.id, y.problem, y.solution, y.meta)
        assert x.image.tobytes() == y.image.tobytes()
    assert [r.id for r in a[:3]] == ["shapes-7-0", "shapes-7-1", "shapes-7-2"]
    assert [r.meta["objects"] for r in a] != [r.meta["objects"] for r in other]
    assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, other)) > 30


def test_hand_drawn_scene_boxes_and_shapes():
    objects = [("red", "circle", 0, 0), ("blue", "square", 1, 2), ("yellow", "triangle", 2, 1)]
    image = np.asarray(render(objects))
    assert image.shape == (84, 84, 3)
    circle, circle_px = drawn_box(image, 0, 0)
    square, square_px = drawn_box(image, 1, 2)
    triangle, triangle_px = drawn_box(image, 2, 1)
    assert circle == [4, 4, 24, 24]
    assert square == [60, 32, 80, 52]
    assert triangle == [32, 60, 52, 80]
    assert (circle_px == (255, 0, 0)).all() and (square_px == (0, 0, 255)).all() and (triangle_px == (255, 255, 0)).all()
    assert len(square_px) == 400  # the square fills its 20x20 box
    assert 250 < len(circle_px) < 400 and (image[4, 4] == cell_tint(0, 0)).all()  # ~ pi * 10^2, corners empty
    assert 150 < len(triangle_px) < 250
    bg = cell_tint(2, 1)
    assert (image[79, 32:52] != bg).any(axis=-1).all()  # base spans the bottom edge
    assert 1 <= (image[60, 32:52] != bg).any(axis=-1).sum() <= 2  # apex at top centre
    assert (image[60, 41:43] != bg).any()
    empty = [(r, c) for r in range(3) for c in range(3) if (r, c) not in {(0, 0), (1, 2), (2, 1)}]
    assert all((image[28 * r:28 * r + 28, 28 * c:28 * c + 28] == cell_tint(r, c)).all() for r, c in empty)
    tints = {cell_tint(r, c) for r in range(3) for c in range(3)}
    assert len(tints) == 9  # every cell tells where it is
    shape_colours = {tuple(c) for c in COLOURS.values()}
    assert not tints & shape_colours and all(t[2] == 128 for t in tints)  # no background looks like a shape


def test_gold_box_bounds_the_drawn_shape_and_scenes_match_meta():
    rows = make_split(200, 1, 0.3)
    for row in rows:
        image, objects = pixels(row), row.meta["objects"]
        assert 1 <= len(objects) <= 3
        assert len({(r, c) for _, _, r, c in objects}) == len(objects)
        assert len({(col, shape) for col, shape, _, _ in objects}) == len(objects)
        for colour, _, r, c in objects:
            box, drawn = drawn_box(image, r, c)
            assert box == [28 * c + 4, 28 * r + 4, 28 * c + 24, 28 * r + 24]
            assert (drawn == RGB[colour]).all()
        occupied = {(r, c) for _, _, r, c in objects}
        assert all((image[28 * r:28 * r + 28, 28 * c:28 * c + 28] == cell_tint(r, c)).all()
                   for r in range(3) for c in range(3) if (r, c) not in occupied)
        if not row.meta["absent"]:
            r, c = row.meta["cell"]
            assert (row.meta["colour"], row.meta["shape"], r, c) in objects
            assert row.solution == [{"bbox_2d": drawn_box(image, r, c)[0]}]


def test_absent_queries_name_no_drawn_shape():
    rows = make_split(200, 2, 0.5)
    absent = [row for row in rows if row.meta["absent"]]
    assert len(absent) == 100
    for row in absent:
        assert row.solution == [] and row.meta["cell"] is None
        assert (row.meta["colour"], row.meta["shape"]) not in {(col, s) for col, s, _, _ in row.meta["objects"]}


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.25, 75), (1.0, 300)])
def test_absent_ratio(ratio, expected):
    assert sum(row.meta["absent"] for row in make_split(300, 3, ratio)) == expected


def test_problem_text_and_think_trace():
    rows = make_split(30, 4, 0.5)
    present = next(row for row in rows if not row.meta["absent"])
    absent = next(row for row in rows if row.meta["absent"])
    colour, shape = present.meta["colour"], present.meta["shape"]
    assert present.problem == (f"Find the {colour} {shape}. Think in <think></think>, then answer its bbox_2d "
                               "in <answer></answer>, or [] if absent.")
    r, c = present.meta["cell"]
    assert think_trace(present) == f"<think>The {colour} {shape} is at row {r + 1}, column {c + 1}.</think>"
    assert think_trace(absent) == f"<think>There is no {absent.meta['colour']} {absent.meta['shape']}.</think>"


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_split(10, 0, 1.5)
    with pytest.raises(ValueError):
        make_split(-1, 0, 0.5)


def test_generation_is_fast():
    start = time.perf_counter()
    make_split(2000, 0, 0.3)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_write_then_load_round_trip(tmp_path, fmt):
    rows = make_split(12, 5, 0.4)
    path = write_dataset(rows, tmp_path / fmt, fmt=fmt)
    assert path == tmp_path / fmt / f"data.{fmt}"
    loaded = load_rows(path, json.loads)
    assert loaded.skipped == []
    assert [r.id for r in loaded.rows] == [r.id for r in rows]
    for original, back in zip(rows, loaded.rows):
        assert back.problem == original.problem
        assert back.solution == original.solution
        assert np.array_equal(pixels(back), pixels(original))


def test_write_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="fmt must be one of"):
        write_dataset(make_split(1, 0, 0.0), tmp_path, fmt="csv")
    assert not any(tmp_path.iterdir())


def test_probe_split_answers_are_true():
    rows = make_probe_split(100, 6)
    assert [r.id for r in rows[:2]] == ["probe-6-0", "probe-6-1"]
    assert [r.image.tobytes() for r in rows] == [r.image.tobytes() for r in make_probe_split(100, 6)]
    kinds = {row.meta["question"] for row in rows}
    assert kinds == {"count", "colour"}
    for row in rows:
        image = pixels(row)
        if row.meta["question"] == "count":
            assert row.problem == "How many shapes are in the image? Answer with a number inside <answer></answer>."
            occupied = sum((image[28 * r:28 * r + 28, 28 * c:28 * c + 28] != cell_tint(r, c)).any()
                           for r in range(3) for c in range(3))
            assert row.solution == str(occupied)
        else:
            shape = row.problem.split()[4].rstrip("?")
            assert row.problem == f"What colour is the {shape}? Answer with a colour name inside <answer></answer>."
            matches = [obj for obj in row.meta["objects"] if obj[1] == shape]
            assert len(matches) == 1 and row.solution == matches[0][0]
            _, drawn = drawn_box(image, matches[0][2], matches[0][3])
            assert (drawn == RGB[row.solution]).all()
