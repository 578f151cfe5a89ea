"""The base model shipped with the package (``tasks/shapes/shipped_base_model/``): its files are
the ones its manifest hashes, it is the model the default config would build, the default (and
the comparison) loads it instead of building, another recipe does not, it is installed with the
package, and ``scripts/build_base_model.py --check`` rebuilds and compares."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from visurf_engine.config import load_config
from visurf_engine.provenance import cpu_model, versions
from visurf_engine.tasks import base_model_path, prepare_base_model
from visurf_engine.tasks.shapes import base_model
from visurf_engine.tasks.shapes.base_model import MANIFEST, SHIPPED, file_digests, recipe, shipped_base_model

ROOT = Path(__file__).resolve().parents[1]
# A 3-step recipe (seconds to build), as the training tests' SMALL uses.
SMALL_RECIPE = ["warmstart.steps=3", "warmstart.batch_size=4", "warmstart.train_size=48"]


def manifest() -> dict:
    return json.loads((SHIPPED / MANIFEST).read_text())


@pytest.fixture
def builder():
    """``scripts/build_base_model.py`` as a module; the torch thread count it sets is restored after."""
    spec = importlib.util.spec_from_file_location("build_base_model", ROOT / "scripts" / "build_base_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_shipped_files_are_the_ones_the_manifest_hashes():
    assert SHIPPED == ROOT / "visurf_engine" / "tasks" / "shapes" / "shipped_base_model"
    files = manifest()["files"]
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= set(files)  # fmt: skip
    assert file_digests(SHIPPED) == files  # every file hashed, no file unlisted, none changed since the build
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 5_000_000  # the tiny model in fp32 and nothing else


def test_manifest_records_how_it_was_built():
    built = manifest()["built_with"]
    assert built["threads"]["torch"] == 1 and built["cpu"] and built["date"] and built["commit"]
    assert {"torch", "transformers", "tokenizers"} <= set(built["versions"])
    assert manifest()["policy_style"] == base_model.POLICY_STYLE


def test_shipped_recipe_is_the_default_configs():
    """What the default (no arguments, or configs/default.yaml) would build is the shipped model;
    a stale artifact (a recipe default or VERSION changed since) fails here: rebuild it."""
    assert manifest()["recipe"] == recipe(load_config()) == recipe(load_config(ROOT / "configs" / "default.yaml"))


def test_the_comparison_runs_on_one_base_model():
    """Every paradigm of the comparison starts from the same base model: one recipe for all its runs
    (the merged-tags base its finished runs were made on, pinned in the config), which differs from
    the shipped one in the tokenizer's tags only."""
    from visurf_engine.compare import load_plan, make_jobs

    jobs = make_jobs(load_plan(ROOT / "configs" / "compare_shapes.yaml"))
    recipes = {json.dumps(recipe(job.cfg), sort_keys=True) for job in jobs}
    assert jobs and len(recipes) == 1
    assert json.loads(recipes.pop()) == {**manifest()["recipe"], "atomic_tags": False}


def test_default_config_loads_the_shipped_model_without_building(tmp_path, monkeypatch, caplog):
    from visurf_engine.models.hf import load_pretrained

    cfg = load_config(None, [f"warmstart.cache_dir={tmp_path / 'cache'}"])  # the cache dir is not in the recipe
    monkeypatch.setattr("visurf_engine.tasks.build_base_model", lambda *a, **k: pytest.fail("built a base model"))
    with caplog.at_level(logging.INFO, logger="visurf_engine.tasks"):
        assert prepare_base_model(cfg, progress=False) == base_model_path(cfg) == SHIPPED
    assert "shipped with the package" in caplog.text and not (tmp_path / "cache").exists()
    model, processor = load_pretrained(base_model_path(cfg))
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 1_300_000
    assert processor.tokenizer.chat_template and processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") is not None


def test_another_recipe_builds_and_caches_its_own(cache, tmp_path, caplog):
    cfg = load_config(None, SMALL_RECIPE + [f"warmstart.cache_dir={tmp_path}"])
    assert shipped_base_model(cfg) is None
    assert "steps: 3 (1000)" in base_model.not_shipped_reason(cfg)
    with pytest.raises(FileNotFoundError, match="prepare_base_model"):
        base_model_path(cfg)  # not built in this (empty) cache, and not the shipped one
    small = load_config(None, SMALL_RECIPE + [f"warmstart.cache_dir={cache}"])
    with caplog.at_level(logging.INFO, logger="visurf_engine.tasks"):
        path = prepare_base_model(small, progress=False)
    assert path.parent == Path(cache) and path != SHIPPED and (path / "warmstart.json").is_file()
    assert "not the shipped one (recipe steps: 3 (1000), batch_size: 4 (32), train_size: 48 (4000))" in caplog.text


def test_model_path_overrides_the_shipped_model(tmp_path):
    assert base_model_path(load_config(None, [f"model.path={tmp_path}"])) == tmp_path


def test_the_wheel_carries_the_shipped_model(tmp_path):
    """What a non-editable install gets: setup.py's ``build_py`` (packages and package data, the
    step that fills a wheel) copies every shipped file."""
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    installed = tmp_path / SHIPPED.relative_to(ROOT)
    assert sorted(p.name for p in installed.iterdir()) == sorted([*manifest()["files"], MANIFEST])
    assert file_digests(installed) == manifest()["files"]


def test_build_script_builds_and_check_compares_with_the_manifest(builder, tmp_path, capsys):
    out = tmp_path / "base"
    assert builder.main(["--out", str(out), *SMALL_RECIPE]) == 0
    written = json.loads((out / MANIFEST).read_text())
    assert written["recipe"] == recipe(load_config(None, SMALL_RECIPE)) and written["files"] == file_digests(out)
    assert torch.get_num_threads() == 1 and written["built_with"]["threads"]["torch"] == 1
    assert builder.main(["--check", "--out", str(out), *SMALL_RECIPE]) == 0  # a rebuild here is the same, bit for bit
    assert "matches its manifest" in capsys.readouterr().out
    assert builder.main(["--check", "--out", str(out), "warmstart.steps=4", *SMALL_RECIPE[1:]]) == 1
    assert "recipe" in capsys.readouterr().err
    (out / "config.json").write_text((out / "config.json").read_text().replace("128", "129"))
    assert builder.main(["--check", "--out", str(out), *SMALL_RECIPE]) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_rebuilding_the_shipped_model_reproduces_it(builder):
    """The full 1000-step rebuild (minutes); bit-exact only on the CPU model and versions it was built with."""
    built = manifest()["built_with"]
    here = {k: versions().get(k) for k in ("torch", "transformers", "tokenizers")}
    if built["cpu"] != cpu_model() or {k: built["versions"].get(k) for k in here} != here:
        pytest.skip(f"built on {built['cpu']} with {built['versions']}; here {cpu_model()} with {here}")
    assert builder.main(["--check"]) == 0
