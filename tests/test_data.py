"""load_rows: every accepted image encoding, every kind of bad row under both policies."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from visurf_engine.data import DataError, load_rows

GOLD = [{"bbox_2d": [1, 2, 3, 4]}]


def parse(value):
    """A tiny grounding-style parser: JSON text or a list, else ValueError."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return value


def png(colour=(10, 20, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), colour).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def record(image, **fields):
    return {"image": image, "problem": "Find it.", "solution": json.dumps(GOLD), **fields}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png((200, 0, 0), mode="RGBA"))
    return tmp_path


def test_jsonl_accepts_every_image_encoding(data_dir):
    absolute = str(data_dir / "imgs" / "a.png")
    path = write_jsonl(data_dir / "train.jsonl", [
        record("imgs/a.png", id="first"),
        record(absolute),
        record({"bytes": b64(png((0, 200, 0), mode="L"))}),
        record("data:image/png;base64," + b64(png((0, 0, 200)))),
        record({"bytes": None, "path": "imgs/a.png"}, solution=GOLD, data_source="x"),
    ])
    result = load_rows(path, parse)
    assert result.skipped == []
    rows = result.rows
    assert [r.id for r in rows] == ["first", "train:1", "train:2", "train:3", "train:4"]
    assert all(r.image.mode == "RGB" and r.image.size == (5, 3) for r in rows)
    grey = Image.new("RGB", (1, 1), (0, 200, 0)).convert("L").getpixel((0, 0))
    assert [r.image.getpixel((4, 2)) for r in rows] == [
        (200, 0, 0), (200, 0, 0), (grey, grey, grey), (0, 0, 200), (200, 0, 0)]
    assert all(r.problem == "Find it." and r.solution == GOLD for r in rows)
    assert rows[4].meta == {"data_source": "x", "file": str(path), "row": 4}


def test_parquet_accepts_bytes_and_hf_dict(data_dir):
    raw = write_parquet(data_dir / "raw.parquet", [record(png((1, 2, 3)), id=None), record(png((4, 5, 6)), id=7)])
    rows = load_rows(raw, parse).rows
    assert [r.id for r in rows] == ["raw:0", "7"]
    assert [r.image.getpixel((0, 0)) for r in rows] == [(1, 2, 3), (4, 5, 6)]

    hf = write_parquet(data_dir / "hf.parquet", [
        record({"bytes": png((9, 9, 9)), "path": "ignored.png"}),
        record({"bytes": None, "path": "imgs/a.png"}),
    ])
    rows = load_rows(hf, parse).rows
    assert [r.image.getpixel((1, 1)) for r in rows] == [(9, 9, 9), (200, 0, 0)]
    assert rows[1].meta == {"file": str(hf), "row": 1}


# (description, JSONL line, bad field, fragment of the reason). Each sits at line 1 of its file.
BAD_JSONL = [
    ("missing field", {"image": "imgs/a.png", "problem": "p"}, "solution", "missing"),
    ("null field", record(None), "image", "is null"),
    ("problem wrong type", record("imgs/a.png", problem=3), "problem", "expected a non-empty string, got int 3"),
    ("image wrong type", record(12), "image", "got int 12"),
    ("id wrong type", record("imgs/a.png", id=[1]), "id", "expected a string or integer"),
    ("missing image file", record("imgs/x.png"), "image", "cannot open 'imgs/x.png': file not found"),
    ("image is a directory", record("imgs"), "image", "cannot open 'imgs'"),
    ("corrupt image bytes", record({"bytes": b64(b"not a png")}), "image", "unrecognised image format"),
    ("invalid base64", record("data:image/png;base64,@@@"), "image", "invalid base64"),
    ("dict without data", record({"bytes": None, "path": None}), "image", "neither 'bytes' nor 'path'"),
    ("unparseable solution", record("imgs/a.png", solution="[{"), "solution", "cannot parse"),
    ("solution not a list", record("imgs/a.png", solution={"bbox_2d": 1}), "solution", "expected a list, got dict"),
    ("bad JSON line", '{"image": "imgs/a.png", ', None, "invalid JSON line"),
    ("JSON line not an object", "[1, 2]", None, "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line, field, reason", [case[1:] for case in BAD_JSONL], ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl_row_raises_naming_file_row_field(data_dir, line, field, reason):
    path = write_jsonl(data_dir / "train.jsonl", [record("imgs/a.png"), line])
    with pytest.raises(DataError) as info:
        load_rows(path, parse)
    message = str(info.value)
    where = f"{path} row 1" + (f", field '{field}'" if field else "")
    assert message.startswith(where + ": "), message
    assert reason in message


def test_skip_keeps_good_rows_and_records_every_bad_one(data_dir):
    lines = [record("imgs/a.png", id="good-0")]
    for i, case in enumerate(BAD_JSONL):
        lines += [case[1], record("imgs/a.png", id=f"good-{i + 1}")]
    path = write_jsonl(data_dir / "mixed.jsonl", lines)
    result = load_rows(path, parse, on_bad_row="skip")
    assert [r.id for r in result.rows] == [f"good-{i}" for i in range(len(BAD_JSONL) + 1)]
    assert [r.meta["row"] for r in result.rows] == list(range(0, len(lines), 2))
    assert all(r.image.getpixel((0, 0)) == (200, 0, 0) and r.solution == GOLD for r in result.rows)
    assert [(b.file, b.row, b.field) for b in result.skipped] == [
        (str(path), 2 * i + 1, case[2]) for i, case in enumerate(BAD_JSONL)]
    assert all(case[3] in b.reason for case, b in zip(BAD_JSONL, result.skipped))


def test_bad_parquet_rows_under_both_policies(data_dir):
    path = write_parquet(data_dir / "train.parquet", [
        record(png(), id="a"),
        record(b"garbage", id="b"),
        record(png(), id="c", problem=None),
        record(png(), id="d", solution="nope"),
        record(None, id="e"),
        record(png(), id="f"),
    ])
    with pytest.raises(DataError, match=r"train\.parquet row 1, field 'image': cannot decode embedded bytes"):
        load_rows(path, parse)
    result = load_rows(path, parse, on_bad_row="skip")
    assert [r.id for r in result.rows] == ["a", "f"]
    assert [(b.row, b.field) for b in result.skipped] == [(1, "image"), (2, "problem"), (3, "solution"), (4, "image")]


def test_parquet_hf_dict_with_missing_file(data_dir):
    path = write_parquet(data_dir / "t.parquet", [record({"bytes": None, "path": "imgs/missing.png"})])
    with pytest.raises(DataError, match=r"t\.parquet row 0, field 'image': cannot open 'imgs/missing.png': file not found"):
        load_rows(path, parse)


def test_missing_column_means_no_usable_rows(data_dir):
    path = write_parquet(data_dir / "t.parquet", [{"image": png(), "solution": "[]"}] * 3)
    with pytest.raises(DataError, match=r"t\.parquet row 0, field 'problem': missing"):
        load_rows(path, parse)
    with pytest.raises(DataError, match=r"no usable rows \(all 3 rows are bad, first: .*row 0, field 'problem'"):
        load_rows(path, parse, on_bad_row="skip")


def test_blank_lines_are_not_rows_but_keep_line_numbers(data_dir):
    path = write_jsonl(data_dir / "t.jsonl", ["", record("imgs/a.png"), "   ", "{oops"])
    with pytest.raises(DataError, match=r"t\.jsonl row 3: invalid JSON line"):
        load_rows(path, parse)
    result = load_rows(path, parse, on_bad_row="skip")
    assert [r.id for r in result.rows] == ["t:1"]
    assert [b.row for b in result.skipped] == [3]


def test_file_level_errors(data_dir):
    (data_dir / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: no usable rows \\(it holds no rows\\)"):
        load_rows(data_dir / "empty.jsonl", parse)
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_rows(data_dir / "nope.jsonl", parse)
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        load_rows(data_dir / "t.csv", parse)
    (data_dir / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read parquet file"):
        load_rows(data_dir / "broken.parquet", parse)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        load_rows(data_dir / "empty.jsonl", parse, on_bad_row="ignore")


def test_decoded_pixels_match_source_exactly(data_dir):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    path = write_jsonl(data_dir / "t.jsonl", [record({"bytes": b64(buffer.getvalue())})])
    assert np.array_equal(np.asarray(load_rows(path, parse).rows[0].image), pixels)
