"""``train.lr_schedule``: the rate of each step against the formulas, on random settings; the
trainer sets it every step (resumed runs continue it); bad settings name the key."""

from __future__ import annotations

import math
import random

import pytest

from visurf_engine.config import ConfigError, TrainConfig, load_config
from visurf_engine.lr_schedule import lr_at


def test_schedules_follow_their_formulas():
    rng = random.Random()
    for _ in range(50):
        steps = rng.randint(5, 300)
        t = TrainConfig(steps=steps, lr=rng.uniform(1e-6, 1e-2), warmup_steps=rng.randint(0, steps // 3),
                        min_lr_ratio=rng.uniform(0, 0.5))  # fmt: skip
        w, m = t.warmup_steps, t.min_lr_ratio
        for schedule in ("constant", "cosine", "linear"):
            t.lr_schedule = schedule
            for s in range(steps):
                p = (s - w) / max(1, steps - w)
                want = (t.lr * (s + 1) / w if s < w else t.lr if schedule == "constant"
                        else t.lr * (m + (1 - m) * ((1 + math.cos(math.pi * p)) / 2 if schedule == "cosine" else 1 - p)))
                assert lr_at(s, t) == pytest.approx(want, rel=1e-12), (schedule, s)
        t.lr_schedule = "cosine"
        assert lr_at(w, t) == pytest.approx(t.lr) and lr_at(steps - 1, t) >= m * t.lr - 1e-15
        assert all(lr_at(s + 1, t) <= lr_at(s, t) + 1e-15 for s in range(w, steps - 1))  # decays monotonically


@pytest.mark.parametrize("override, key", [("train.lr_schedule=step", "train.lr_schedule"),
                                           ("train.warmup_steps=-1", "train.warmup_steps"),
                                           ("train.min_lr_ratio=2", "train.min_lr_ratio")])  # fmt: skip
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_the_trainer_steps_at_the_scheduled_rate_and_resumes_it(cache, tmp_path):
    """Each step's logged ``lr`` is ``lr_at`` of that step; a run resumed from step 2's checkpoint
    continues the schedule (no warmup again)."""
    from engine_testing.runs import small_cfg, step_metrics
    from visurf_engine.trainer import Trainer

    extra = ["train.steps=4", "train.lr_schedule=cosine", "train.warmup_steps=2", "train.min_lr_ratio=0.1",
             "train.eval_every=0", "train.save_every=2", "data.probe_size=0"]  # fmt: skip
    cfg = small_cfg(cache, tmp_path / "run", *extra)
    trainer = Trainer(cfg)
    for step in range(2):
        trainer.metrics.log(step + 1, trainer.step(step))
    trainer.save(2)
    trainer.metrics.close()
    Trainer(small_cfg(cache, tmp_path / "run", *extra, "train.resume=true")).run()
    logged = [m["lr"] for m in step_metrics(tmp_path / "run")]
    assert logged == pytest.approx([lr_at(s, cfg.train) for s in range(4)], rel=1e-12)
    assert logged[0] < logged[1] == pytest.approx(cfg.train.lr) and logged[3] < logged[2]
