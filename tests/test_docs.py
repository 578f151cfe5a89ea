"""The documented defaults are the code's: README's config reference and configs/default.yaml
against ``visurf_engine.config``'s dataclass defaults; ``scripts/readme_table.py`` writes the
README's default-run tables and its ``--check`` fails on a changed metric, not on wall time."""

from __future__ import annotations

import importlib.util
import json
import random
import re
from pathlib import Path

import pytest

from visurf_engine.config import Config, config_from_mapping, load_config

ROOT = Path(__file__).resolve().parents[1]
# Rows whose default is prose rather than one value per key (checked by hand against config.py).
PROSE_DEFAULTS = {"data.probe_size"}


def _split_top_level(cell: str) -> list[str]:
    """'2e-4, (0.9, 0.999), 0' -> ['2e-4', '(0.9, 0.999)', '0']: commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in cell:
        depth += ch in "([" and 1 or ch in ")]" and -1 or 0
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def _config_table() -> list[tuple[str, str, int]]:
    """(dotted key, documented default, README line) for every key of the Config reference table."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("## Config reference")
    rows = []
    for no, line in enumerate(lines[start:], start + 1):
        if line.startswith("## ") and no > start + 1:
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        section = keys[0].rsplit(".", 1)[0]
        keys = [k if "." in k else f"{section}.{k}" for k in keys]
        if keys[0] in PROSE_DEFAULTS:
            continue
        values = _split_top_level(cells[1])
        assert len(values) == len(keys), f"README.md:{no}: {len(keys)} keys but {len(values)} defaults: {cells[1]!r}"
        rows += [(k, v, no) for k, v in zip(keys, values)]
    return rows


def _default(cfg: Config, key: str):
    obj = cfg
    for part in key.split("."):
        assert hasattr(obj, part), f"README documents {key!r}, which the config does not have"
        obj = getattr(obj, part)
    return obj


def _render(value) -> str:
    """A default as the README writes it: `text`, true/false, null, numbers, (a, b)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, tuple):
        return "(" + ", ".join(_render(v) for v in value) + ")"
    return repr(value)


def _same(documented: str, value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(documented) == float(value)
        except ValueError:
            return False
    if isinstance(value, tuple):
        inner = _split_top_level(documented.strip("()"))
        return len(inner) == len(value) and all(_same(d, v) for d, v in zip(inner, value))
    return documented == _render(value)


def test_readme_config_reference_matches_the_code():
    cfg = load_config()
    rows = _config_table()
    assert len(rows) > 60, "the Config reference table was not found or not parsed"
    wrong = [f"README.md:{no}: {k} documented {d!r}, config.py says {_render(_default(cfg, k))}"
             for k, d, no in rows if not _same(d, _default(cfg, k))]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_every_config_key_is_documented():
    documented = {k for k, _, _ in _config_table()} | PROSE_DEFAULTS
    flat = {}

    def walk(d: dict, prefix: str):
        for k, v in d.items():
            (walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.setdefault(f"{prefix}{k}", v))

    walk(load_config().to_dict(), "")
    missing = sorted(set(flat) - documented)
    assert not missing, f"config keys missing from README's Config reference: {missing}"


@pytest.mark.parametrize("path", ["configs/default.yaml"])
def test_default_yaml_is_the_no_argument_default(path):
    import yaml

    written = config_from_mapping(yaml.safe_load((ROOT / path).read_text()), source=path)
    assert written.to_dict() == load_config().to_dict()


def _readme_table():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "scripts" / "readme_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_table_writes_and_checks(tmp_path, capsys):
    rt, rng = _readme_table(), random.Random()
    metrics = {m: rng.random() for m in rt.METRICS}
    run = {"base": metrics, "final": {m: rng.random() for m in rt.METRICS}, "wall_s": 400.0 + rng.random(),
           "provenance": {"versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}}}
    stat = lambda: {"mean": rng.random(), "std": rng.random(), "n": 5}  # noqa: E731
    results = {"summary": {"base": {m: stat() for m in rt.SEED_METRICS}, "configs": {"visurf": {m: stat() for m in rt.SEED_METRICS}}},
               "runs": [{"name": "visurf", "seed": s, "final": {"n_acc": rng.random()}} for s in range(5)]}
    ev, res, readme = tmp_path / "eval.json", tmp_path / "results.json", tmp_path / "README.md"
    ev.write_text(json.dumps(run))
    res.write_text(json.dumps(results))
    readme.write_text("intro\n<!-- BEGIN default-run: scripts/readme_table.py -->\n<!-- END default-run -->\nmiddle\n"
                      "<!-- BEGIN default-seeds: scripts/readme_table.py -->\nstale\n<!-- END default-seeds -->\nend\n")
    args = ["--eval", str(ev), "--results", str(res), "--readme", str(readme)]
    assert rt.main([*args, "--check"]) == 1  # empty / stale blocks
    assert rt.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("\nend\n") and "stale" not in text
    assert f"| n_acc | {metrics['n_acc']:.4f} | {run['final']['n_acc']:.4f} |" in text
    assert rt.main([*args, "--check"]) == 0
    run["wall_s"] += 100  # another machine's wall time: still the same table
    ev.write_text(json.dumps(run))
    assert rt.main([*args, "--check"]) == 0
    run["final"]["giou"] += 1e-3  # a metric that moved: the check fails and names the row
    ev.write_text(json.dumps(run))
    capsys.readouterr()
    assert rt.main([*args, "--check"]) == 1
    assert "missing row | giou |" in capsys.readouterr().out
