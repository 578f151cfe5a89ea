"""The documented defaults are the code's: README's config reference and configs/default.yaml
against ``visurf_engine.config``'s dataclass defaults; ``scripts/readme_table.py`` writes the
README's default-run tables and its ``--check`` fails on a changed metric, not on wall time."""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
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
    """The distribution block (median, min, max over the report's runs; the counts), the one-run
    block, and ``--check``: a run inside the widened range passes, one outside it or from another
    base model fails naming the metric."""
    rt, rng = _readme_table(), random.Random()
    base = {m: rng.random() for m in rt.METRICS}
    finals = [{m: rng.uniform(0.3, 0.9) for m in rt.METRICS} for _ in range(6)]
    finals[0] |= {"n_acc": 1.0, "bbox_acc": 0.05}  # an always-[] run
    runs = [{"name": f"threads{1 + s % 2}", "seed": s // 2, "base": base, "final": f,
             "provenance": {"threads": {"torch": 1 + s % 2}}} for s, f in enumerate(finals)]  # fmt: skip
    run = {"base": base, "final": dict(finals[3]), "wall_s": 400.0 + rng.random(),
           "provenance": {"versions": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}, "device": "cpu X",
                          "threads": {"torch": 2}}}  # fmt: skip
    ev, dist, readme = tmp_path / "eval.json", tmp_path / "dist.json", tmp_path / "README.md"
    ev.write_text(json.dumps(run))
    dist.write_text(json.dumps({"runs": runs}))
    readme.write_text("intro\n<!-- BEGIN default-distribution: scripts/readme_table.py -->\nstale\n"
                      "<!-- END default-distribution -->\nmiddle\n"
                      "<!-- BEGIN default-run: scripts/readme_table.py -->\n<!-- END default-run -->\nend\n")  # fmt: skip
    args = ["--eval", str(ev), "--distribution", str(dist), "--readme", str(readme)]
    assert rt.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("\nend\n") and "stale" not in text
    g = sorted(f["giou"] for f in finals)
    assert f"| giou | {base['giou']:.3f} | {(g[2] + g[3]) / 2:.3f} | {g[0]:.3f} | {g[-1]:.3f} |" in text
    ok = sum(f["n_acc"] >= 0.5 and f["bbox_acc"] >= 0.5 for f in finals)
    assert f"6 runs (seeds 0-2 x 1 and 2 torch thread(s)): {ok} end with" in text and "; 1 ended answering" in text
    assert f"| n_acc | {base['n_acc']:.4f} | {run['final']['n_acc']:.4f} |" in text and "cpu X, 2 torch thread(s)" in text
    assert rt.main([*args, "--check"]) == 0  # one of the runs itself
    sd = statistics.stdev(f["giou"] for f in finals)
    for giou, code in ((g[-1] + 0.9 * sd, 0), (g[0] - 0.9 * sd, 0), (g[-1] + 1.1 * sd, 1)):
        ev.write_text(json.dumps(run | {"final": run["final"] | {"giou": min(giou, 1.0)}}))
        capsys.readouterr()
        assert rt.main([*args, "--check"]) == code or giou > 1.0
    if g[-1] + 1.1 * sd <= 1.0:
        assert "giou: final" in capsys.readouterr().out
    ev.write_text(json.dumps(run | {"base": base | {"bbox_acc": base["bbox_acc"] + 0.05}}))  # another base model
    capsys.readouterr()
    assert rt.main([*args, "--check"]) == 1 and "bbox_acc: base" in capsys.readouterr().out