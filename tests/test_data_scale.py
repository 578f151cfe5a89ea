"""Data at scale: rows validated by their image header at start and decoded when a step needs
them; a truncated JPEG (row 7) under both policies, at decode time; a bad image met in
training replaced by the same draw on every rank and on resume; datasets directories;
parquet row groups; the held-out split of data.eval_split."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from engine_testing.runs import small_cfg
from visurf_engine.data import BadImage, DataError, PromptSampler, decodable, fetch_rows, load_rows, write_dataset
from visurf_engine.data import sources
from visurf_engine.tasks import load_task
from visurf_engine.tasks.shapes import make_split
from visurf_engine.rewards import get_reward
from visurf_engine.trainer import Trainer


def jpeg(seed: int, size=(32, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def records(n: int, bad=()):
    """``n`` rows ``r0..``; the JPEGs of rows ``bad`` cut to half their length (valid header)."""
    out = []
    for i in range(n):
        data = jpeg(i)
        out.append({"id": f"r{i}", "image": data[: len(data) // 2] if i in bad else data, "problem": "Find it.",
                    "solution": "[]"})  # fmt: skip
    return out


def write(tmp_path, fmt, recs):
    if fmt == "parquet":
        path = tmp_path / "t.parquet"
        pq.write_table(pa.Table.from_pylist(recs), path, row_group_size=4)
    else:
        path = tmp_path / "t.jsonl"
        for r in recs:
            (tmp_path / f"{r['id']}.jpg").write_bytes(r["image"])
        path.write_text("".join(json.dumps(r | {"image": f"{r['id']}.jpg"}) + "\n" for r in recs))
    return path


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes: each makes one PIL file decoder (``Image._getdecoder``; "raw" is
    what ``Image.fromarray`` uses, not a file decoder)."""
    count = [0]
    make = Image._getdecoder

    def counting(mode, name, *args):
        count[0] += name != "raw"
        return make(mode, name, *args)

    monkeypatch.setattr(Image, "_getdecoder", counting)
    return count


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_truncated_jpeg_in_row_7_under_both_policies(tmp_path, fmt, decodes):
    path = write(tmp_path, fmt, records(10, bad={7}))
    for policy in ("error", "skip"):  # its header is fine: both policies accept the file
        result = load_rows(path, json.loads, policy)
        assert len(result.rows) == 10 and result.skipped == [] and decodes[0] == 0
    rows = result.rows
    assert rows[7].id == "r7" and rows[7].meta["row"] == 7
    what = "embedded bytes" if fmt == "parquet" else "'r7.jpg'"
    message = rf"{path} row 7, field 'image': cannot decode {what}: image file is truncated"
    with pytest.raises(BadImage, match=message):
        fetch_rows(rows, [3, 7], "error", lambda slot, attempt: 0)
    with pytest.raises(BadImage, match=message):
        rows[7].image
    draws = []
    got, bad = fetch_rows(rows, [3, 7, 5], "skip", lambda slot, attempt: draws.append((slot, attempt)) or [7, 2][attempt])
    assert [r.id for r in got] == ["r3", "r2", "r5"] and draws == [(1, 0), (1, 1)]  # r7 again, then r2
    assert [(b.row, b.field) for b in bad] == [(7, "image"), (7, "image")] and all(isinstance(r.source, Image.Image) for r in got)
    assert decodable(rows, 9, "skip")[0] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    with pytest.raises(BadImage, match=message):
        decodable(rows, 9, "error")


def test_start_up_on_5k_rows_decodes_no_image(tmp_path, decodes):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(records(5000)), path, row_group_size=100)
    rows = load_rows(path, json.loads).rows
    assert len(rows) == 5000 and decodes[0] == 0
    image = rows[4321].image
    assert decodes[0] == 1 and image.tobytes() == Image.open(io.BytesIO(jpeg(4321))).convert("RGB").tobytes()
    decodes[0] = 0
    assert [r.id for r in rows[4998:]] == ["r4998", "r4999"] and decodes[0] == 0  # a slice reads records, not pixels


def test_unreadable_header_is_found_at_start(tmp_path):
    recs = records(3)
    recs[1]["image"] = b"\xff\xd8 not a jpeg"
    path = write(tmp_path, "parquet", recs)
    with pytest.raises(DataError, match=r"t\.parquet row 1, field 'image': cannot decode embedded bytes: unrecognised"):
        load_rows(path, json.loads)
    assert [b.row for b in load_rows(path, json.loads, "skip").skipped] == [1]


def test_parquet_row_groups_above_the_limit_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "one-group.parquet"
    pq.write_table(pa.Table.from_pylist(records(50)), path)  # pyarrow's default: one group
    monkeypatch.setattr(sources, "MAX_ROW_GROUP_BYTES", 10_000)
    with pytest.raises(DataError, match=r"one-group.parquet: a row group of 50 rows holds .* row_group_size=100"):
        load_rows(path, json.loads)


def test_datasets_directory_is_a_source(tmp_path, decodes):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (6, 7, 3), dtype=np.uint8)) for i in range(5)]
    features = datasets.Features({"image": datasets.Image(), "problem": datasets.Value("string"),
                                  "solution": datasets.Value("string"), "source": datasets.Value("string")})  # fmt: skip
    ds = datasets.Dataset.from_dict({"image": images, "problem": ["Find it."] * 5, "solution": ["[]"] * 5,
                                     "source": ["x"] * 5}, features=features)  # fmt: skip
    ds.save_to_disk(str(tmp_path / "train"))
    decodes[0] = 0
    rows = load_rows(tmp_path / "train", json.loads).rows
    assert len(rows) == 5 and decodes[0] == 0
    assert rows[3].id == "train:3" and rows[3].meta == {"source": "x", "file": str(tmp_path / "train"), "row": 3}
    assert rows[3].image.tobytes() == images[3].tobytes()  # stored as PNG: lossless
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "both"))
    with pytest.raises(DataError, match=r"both: holds the splits train, validation; give one split's directory"):
        load_rows(tmp_path / "both", json.loads)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_rows(tmp_path / "plain", json.loads)


def test_eval_split_holds_out_a_seeded_share_by_row_id(tmp_path, cache):
    path = write_dataset(make_split(400, seed=3, absent_ratio=0.3), tmp_path, fmt="parquet")
    spec = get_reward("grounding")
    cfg = lambda *extra: small_cfg(cache, tmp_path / "run", "data.task=files", f"data.train_path={path}", *extra)  # noqa: E731
    task = load_task(cfg("data.eval_split=0.25", "data.eval_size=1000"), spec)
    train, evals = [r.id for r in task.train], [r.id for r in task.eval]
    assert 60 < len(evals) < 140 and not set(train) & set(evals) and len(train) + len(evals) == 400
    again = load_task(cfg("data.eval_split=0.25", "data.eval_size=1000"), spec)
    assert [r.id for r in again.eval] == evals  # deterministic
    other = load_task(cfg("data.eval_split=0.25", "data.eval_size=1000", "data.seed=5"), spec)
    assert [r.id for r in other.eval] != evals  # seeded
    assert [r.id for r in load_task(cfg("data.eval_split=0.25", "data.eval_size=10"), spec).eval] == evals[:10]


def test_replacement_draws_are_pure_functions_of_step_and_slot():
    a, b = PromptSampler(50, seed=7), PromptSampler(50, seed=7)
    b.next(33)  # the epoch position does not enter
    draws = [a.replacement(step, slot, attempt) for step in range(3) for slot in range(4) for attempt in range(3)]
    assert draws == [b.replacement(step, slot, attempt) for step in range(3) for slot in range(4) for attempt in range(3)]
    assert len(set(draws)) > 20 and all(0 <= d < 50 for d in draws)
    assert PromptSampler(50, seed=8).replacement(0, 0, 0) != a.replacement(0, 0, 0) or \
        PromptSampler(50, seed=8).replacement(0, 1, 0) != a.replacement(0, 1, 0)  # fmt: skip


def test_training_replaces_bad_images_and_resumes_exactly(tmp_path, cache):
    """Half the training rows have truncated JPEGs: under skip every step draws replacements
    (counted), a run stopped at step 2 and resumed matches the uninterrupted one bit for bit;
    under error the first bad image stops the run, naming file, row and field."""
    rows = make_split(24, seed=1234, absent_ratio=0.3)
    path = write_dataset(rows, tmp_path / "data", fmt="parquet")
    table = pq.read_table(path).to_pylist()
    for i, rec in enumerate(table):
        buffer = io.BytesIO()
        rows[i].image.save(buffer, format="JPEG")
        rec["image"] = buffer.getvalue()[: None if i % 2 else len(buffer.getvalue()) // 2]
    pq.write_table(pa.Table.from_pylist(table), path, row_group_size=5)
    files = ["data.task=files", f"data.train_path={path}", "data.eval_split=0.3", "data.probe_size=0",
             "data.on_bad_row=skip", "algo.paradigm=rlvr"]  # fmt: skip

    def run(out, *extra):
        trainer = Trainer(small_cfg(cache, tmp_path / out, *files, *extra))
        trainer.run()
        return trainer

    full = run("full", "train.steps=3")
    run("split", "train.steps=2")
    resumed = run("split", "train.steps=3", "train.resume=true")
    a, b = full.policy.model.state_dict(), resumed.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda out: [m for m in map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]  # noqa: E731
    bad = [m["data/bad_images"] for m in lines("full")]
    assert [m["data/bad_images"] for m in lines("split")] == bad and sum(bad) > 0
    assert all(r.meta["row"] % 2 for r in full.data.eval)  # the eval set is checked at start: bad rows left out
    with pytest.raises(BadImage, match=rf"{path} row \d+, field 'image': cannot decode embedded bytes: image file is truncated"):
        run("strict", "train.steps=3", "data.on_bad_row=error", "data.eval_size=1")
