"""The documented defaults are the code's: README's config reference and configs/default.yaml
against ``visurf_engine.config``'s dataclass defaults."""

from __future__ import annotations

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
