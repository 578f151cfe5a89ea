"""Why a grounding run drifts to answering ``[]``: ``python scripts/diagnose_collapse.py RUN_DIR [RUN_DIR ...]``.

For the base model and every checkpoint a run directory keeps (run it with e.g.
``train.save_every=50 train.keep_checkpoints=20``), on the run's held-out rows split into
present- and absent-object prompts (the config's ``data.eval_*``):

- ``greedy_empty``: the share of greedy answers that are ``[]``;
- ``p_empty``: the policy's probability of the empty answer at the decision point: the first
  token where a ``[]`` answer and a box answer (both in the policy's style, after an empty think
  slot) tokenize differently decides between "no object" and a box (the merged-tag tokenizer's
  ``>[]</`` / ``>[{"``, the atomic-tags one's ``[]`` / ``[{"`` after ``<answer>``): ``p_empty`` /
  ``p_box`` are those two tokens' probabilities there, after the policy's own greedy prefix up to
  that token (teacher-forced, the fused no-grad pass);
  ``p_empty > p_box`` is where greedy decoding flips to ``[]``;
- ``sampled_empty``: the share of ``--samples`` sampled completions (the run's temperature) that
  answer ``[]``;
- on present prompts, what training would do with a step's groups at that checkpoint: the run's
  rollouts (G samples) scored, the gold added as the run's paradigm adds it (ViSurf: align,
  eliminate, smooth), advantages formed (``trainer.Trainer`` and ``algo`` code, not a copy): the
  mean advantage of the ``[]`` rollouts, of the wrong boxes, and of the gold, and the share of
  groups where a ``[]`` rollout is exactly as good as a wrong box (both score 0 accuracy).

Prints one table per run and writes ``collapse.json`` beside its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model

from visurf_engine.config import config_from_mapping
from visurf_engine.tasks import prepare_base_model
from visurf_engine.tasks.shapes.base_model import POLICY_STYLE
from visurf_engine.trainer import Trainer


def decision_tokens(tokenizer, spec, box: list[dict]) -> tuple[int, int]:
    """The empty answer's and the box answer's token at the first position where the policy-style
    completions of ``[]`` and of the solution ``box`` tokenize differently (the decision point)."""
    empty, box = (tokenizer(spec.render(s, POLICY_STYLE), add_special_tokens=False)["input_ids"] for s in ([], box))
    at = next(j for j, (a, b) in enumerate(zip(empty, box)) if a != b)
    return empty[at], box[at]


@torch.no_grad()
def decision(trainer: Trainer, rows) -> dict[str, float]:
    """Greedy ``[]`` share, and the mean probabilities of the empty / box token after ``<answer``."""
    policy, tok = trainer.policy, trainer.policy.tokenizer
    empty, box = decision_tokens(tok, trainer.spec, next(r.solution for r in trainer.data.eval if r.solution))
    prompts = policy.encode([r.problem for r in rows], [r.image for r in rows])
    greedy = trainer.rollout.greedy(prompts)
    texts = tok.batch_decode(greedy, skip_special_tokens=True)
    prefixes, idx = [], []
    for i, ids in enumerate(greedy):  # the greedy prefix up to the decision token (empty or box), when there is one
        at = next((j for j, t in enumerate(ids) if t in (empty, box)), None)
        if at is not None:
            prefixes.append(ids[:at])
            idx.append(i)
    out = {"greedy_empty": sum(trainer.spec.extract_answer(t) == [] for t in texts) / len(rows)}
    if idx:
        for name, token in (("p_empty", empty), ("p_box", box)):
            logp = trainer.rollout.logprobs(prompts, idx, [p + [token] for p in prefixes])
            out[name] = float(torch.stack([lp[-1] for lp in logp]).exp().mean())
    return out


def sampled_and_advantages(trainer: Trainer, rows, samples: int) -> dict[str, float]:
    """``[]`` share of sampled completions; on present rows, a step's groups and their advantages."""
    cfg = trainer.cfg
    prompts = trainer.policy.encode([r.problem for r in rows], [r.image for r in rows])
    sampled = trainer.rollout.sample(prompts, samples).tokens
    texts = [trainer.policy.tokenizer.batch_decode(g, skip_special_tokens=True) for g in sampled]
    out = {"sampled_empty": sum(trainer.spec.extract_answer(t) == [] for g in texts for t in g) / (len(rows) * samples)}
    if not rows[0].solution:  # absent prompts: no advantages to read
        return out
    phase = trainer.paradigm.phase(cfg.train.steps - 1, trainer.sft_steps)
    groups = [g[: cfg.rollout.n] for g in sampled]
    texts, rewards, _, _ = trainer._score_rollouts(rows, groups)
    if phase.gold:
        _, rewards, _, _ = trainer._gold(phase, rows, prompts, texts, rewards)
    adv_r, adv_g = phase.advantages(rewards, norm_by_std=cfg.algo.norm_by_std, eps=cfg.algo.adv_eps)
    is_empty = torch.tensor([[trainer.spec.extract_answer(t) == [] for t in g] for g in texts])
    wrong_box = ~is_empty & ~rewards.solved
    if adv_r is not None:
        out["adv_empty"] = float(adv_r[is_empty].mean()) if is_empty.any() else float("nan")
        out["adv_wrong_box"] = float(adv_r[wrong_box].mean()) if wrong_box.any() else float("nan")
        r = rewards.rollout
        ties = [bool((r[b][is_empty[b]] == r[b][wrong_box[b]].max()).any()) for b in range(len(rows))
                if is_empty[b].any() and wrong_box[b].any()]  # fmt: skip
        out["empty_ties_wrong_box"] = sum(ties) / len(ties) if ties else float("nan")
    if adv_g is not None:
        out["adv_gold"] = float(adv_g.mean())
    return out


def run_trainer(config: dict, *overrides: str) -> Trainer:
    """A trainer of a finished run's ``config`` (+ ``overrides``), in eval mode, to score its checkpoints: the
    base model prepared first (one that is not the shipped one is warm-started, cached), outputs to a throwaway
    directory. Also used by ``absent_breakdown.py``."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_mapping(config, [f"train.output_dir={tmp}", "train.progress=false", *overrides])
        prepare_base_model(cfg, progress=False)
        trainer = Trainer(cfg)
    trainer.policy.model.eval()
    return trainer


def diagnose_run(run: Path, samples: int, limit: int) -> list[dict]:
    config = json.loads(next(run.glob("checkpoints/step_*/state.json")).read_text())["config"]
    steps = sorted(run.glob("checkpoints/step_*"), key=lambda p: int(p.name.split("_")[1]))
    trainer = run_trainer(config, "algo.kl_coef=0")
    if samples < trainer.cfg.rollout.n:  # a step's groups are the first rollout.n samples of each prompt
        raise SystemExit(f"{run}: --samples {samples} is below the run's rollout.n = {trainer.cfg.rollout.n}; "
                         f"pass --samples {trainer.cfg.rollout.n} or more")  # fmt: skip
    present = [r for r in trainer.data.eval if r.solution][:limit]
    absent = [r for r in trainer.data.eval if not r.solution][:limit]
    table = []
    for step_dir in [None, *steps]:
        if step_dir is not None:
            load_model(trainer.policy.model, str(step_dir / "model.safetensors"))
        torch.manual_seed(0)
        row = {"step": int(step_dir.name.split("_")[1]) if step_dir else 0}
        for kind, rows in (("present", present), ("absent", absent)):
            got = decision(trainer, rows) | sampled_and_advantages(trainer, rows, samples)
            row |= {f"{kind}/{k}": v for k, v in got.items()}
        table.append(row)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=8, help="sampled completions per prompt")
    parser.add_argument("--rows", type=int, default=100, help="present and absent held-out rows (each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for run in args.runs:
        table = diagnose_run(run, args.samples, args.rows)
        (run / "collapse.json").write_text(json.dumps(table, indent=1))
        keys = [k for k in table[0] if k != "step"]
        print(f"\n{run}\n" + "step " + " ".join(f"{k:>22s}" for k in keys))
        for row in table:
            print(f"{row['step']:4d} " + " ".join(f"{row.get(k, float('nan')):22.3f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
