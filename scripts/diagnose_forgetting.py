"""Why the forgetting probe's answers break: ``python scripts/diagnose_forgetting.py RUN_DIR [RUN_DIR ...]``.

For the base model and the last checkpoint of each run directory (a ``train.output_dir``), on
the probe split of the run's config (count / colour questions post-training never sees):

- **greedy answers**, classified: ``correct``; ``wrong`` (well formed, wrong content);
  ``think_leak`` (a ``<think>`` / ``</think>`` tag inside or after the answer: the grounding
  template leaking in); ``unterminated`` (no ``</answer>``); ``other``;
- **teacher-forced log-probs of the probe target** ``<answer>{solution}</answer><|im_end|>``,
  per part: the opening tag, the content, the closing tag, the end of turn, and the entropy of
  the policy at each part (the fused no-grad pass, as training scores);
- **what replaces the answer**: at the first content position (right after ``<answer>``,
  teacher-forced) the mean probability of the end-of-turn token and the share of rows where
  it is the most likely token (an answer closed before it starts); right after the content,
  the policy's most likely next token, counted over rows, and the share of rows whose top
  token is not the closing tag's first token.

Prints one table and writes ``forgetting.json`` next to each run's ``metrics.jsonl``; ``--reuse``
reads that file instead of recomputing, ``--by-config`` adds the mean over each configuration's
runs (``runs/compare_shapes/<configuration>/seed<k>``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_model
from visurf_kernels import LossSpec, fused_logprobs

from visurf_engine import checkpoint as ckpt
from visurf_engine.config import config_from_mapping
from visurf_engine.eval.evaluate import greedy_completions
from visurf_engine.models.hf import load_pretrained
from visurf_engine.models.policy import Batching, Policy
from visurf_engine.rollout.hf import HFRollout
from visurf_engine.tasks import prepare_base_model
from visurf_engine.tasks.shapes.probe import make_probe_split, probe_correct

PARTS = ("open", "content", "close", "eos")


def classify(text: str, solution: str) -> str:
    if probe_correct(text, solution):
        return "correct"
    if "think>" in text:
        return "think_leak"
    if "</answer>" not in text:
        return "unterminated"
    return "wrong" if text.strip().startswith("<answer>") else "other"


def part_slices(policy: Policy, solution: str) -> tuple[list[int], dict[str, slice]]:
    """The target's token ids and the slice of each part (the tokenizer may merge across parts:
    parts are located by decoding growing prefixes)."""
    open_ids = policy.tokenizer("<answer>", add_special_tokens=False)["input_ids"]
    body = policy.tokenizer(f"<answer>{solution}", add_special_tokens=False)["input_ids"]
    full = policy.encode_text(f"<answer>{solution}</answer>")
    n_open = len(open_ids) if body[: len(open_ids)] == open_ids else 0
    return full, {"open": slice(0, n_open), "content": slice(n_open, len(body)),
                  "close": slice(len(body), len(full) - 1), "eos": slice(len(full) - 1, len(full))}  # fmt: skip


@torch.no_grad()
def diagnose(policy: Policy, rows) -> dict:
    texts = greedy_completions(policy, HFRollout(policy, _rollout_cfg()), rows)
    kinds = Counter(classify(t, r.solution) for t, r in zip(texts, rows))
    prompts = policy.encode([r.problem for r in rows], [r.image for r in rows])
    targets, slices = zip(*(part_slices(policy, r.solution) for r in rows))
    batch = policy.collate(prompts, range(len(rows)), list(targets), Batching())
    hidden = policy.completion_hidden(batch)
    logp, entropy = fused_logprobs(hidden, policy.lm_head_weight, batch.targets, LossSpec(with_entropy=True))
    per_row = torch.split(torch.stack([logp, entropy], 1), batch.lengths.tolist())
    parts = {p: {"logp": 0.0, "entropy": 0.0, "tokens": 0} for p in PARTS}
    replaced, close_first, eos_p, eos_top = Counter(), 0, 0.0, 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), batch.lengths.cumsum(0)])
    for k, (values, sl) in enumerate(zip(per_row, slices)):
        for p in PARTS:
            v = values[sl[p]]
            parts[p]["logp"] += float(v[:, 0].sum())
            parts[p]["entropy"] += float(v[:, 1].sum())
            parts[p]["tokens"] += len(v)
        at = int(offsets[k]) + sl["close"].start  # the hidden state that predicts the closing tag's first token
        top = int((hidden[at] @ policy.lm_head_weight.T).argmax())
        replaced[policy.tokenizer.decode([top])] += 1
        close_first += top == targets[k][sl["close"].start]
        first = torch.softmax(hidden[int(offsets[k]) + sl["content"].start] @ policy.lm_head_weight.T, dim=-1)
        eos_p += float(first[policy.eos_id])
        eos_top += int(first.argmax()) == policy.eos_id
    summary = {p: {"logp_per_token": v["logp"] / max(v["tokens"], 1), "entropy": v["entropy"] / max(v["tokens"], 1)}
               for p, v in parts.items()}  # fmt: skip
    return {
        "rows": len(rows), "greedy": {k: kinds[k] / len(rows) for k in ("correct", "wrong", "think_leak", "unterminated", "other")},
        "target": summary, "top_after_content": dict(replaced.most_common(6)),
        "close_not_top": 1 - close_first / len(rows), "eos_at_content": eos_p / len(rows),
        "eos_top_at_content": eos_top / len(rows), "examples": texts[:6],
    }  # fmt: skip


def _rollout_cfg():
    from visurf_engine.config import RolloutConfig

    return RolloutConfig(eval_max_new_tokens=24)


def load_run(run: Path):
    """``(config, policy at the run's last checkpoint, base policy)``."""
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    if latest is None:
        raise SystemExit(f"{run}: no checkpoint (checkpoints/latest)")
    cfg = config_from_mapping(json.loads((latest / "state.json").read_text())["config"])
    base = prepare_base_model(cfg, progress=False)  # warm-started (cached) first when it is not the shipped one
    model, processor = load_pretrained(base)
    load_model(model, str(latest / "model.safetensors"), strict=True)
    base_model, _ = load_pretrained(base)
    return cfg, Policy(model.eval(), processor), Policy(base_model.eval(), processor)


COLUMNS = (("correct", lambda r: r["greedy"]["correct"], "7.2f"), ("leak", lambda r: r["greedy"]["think_leak"], "6.2f"),
           ("unterm", lambda r: r["greedy"]["unterminated"], "6.2f"),
           ("lp open", lambda r: r["target"]["open"]["logp_per_token"], "8.3f"),
           ("lp cont", lambda r: r["target"]["content"]["logp_per_token"], "8.3f"),
           ("lp close", lambda r: r["target"]["close"]["logp_per_token"], "8.3f"),
           ("H cont", lambda r: r["target"]["content"]["entropy"], "7.3f"), ("P(eos)", lambda r: r["eos_at_content"], "7.3f"),
           ("eos top", lambda r: r["eos_top_at_content"], "7.2f"), ("close!top", lambda r: r["close_not_top"], "9.2f"))  # fmt: skip


def print_table(rows: dict[str, list[dict]]) -> None:
    """One line per name: the column values, averaged over the name's results."""
    print(f"{'model':40s} " + " ".join(f"{c:>{int(f.split('.')[0])}s}" for c, _, f in COLUMNS) + "   n")
    for name, rs in rows.items():
        cells = " ".join(format(sum(get(r) for r in rs) / len(rs), f) for _, get, f in COLUMNS)
        print(f"{name[-40:]:40s} {cells} {len(rs):3d}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--reuse", action="store_true", help="read a run's forgetting.json when it has one")
    ap.add_argument("--by-config", action="store_true",
                    help="also print the mean over the runs of each configuration (the run directory's parent)")
    args = ap.parse_args(argv)
    results = {}
    for run in args.runs:
        saved = run / "forgetting.json"
        if args.reuse and saved.is_file():
            data = json.loads(saved.read_text())
            results.setdefault("base", data["base"])
            results[str(run)] = data["final"]
            continue
        cfg, policy, base = load_run(run)
        rows = make_probe_split(cfg.data.probe_size, seed=cfg.data.seed + 1)
        if "base" not in results:
            results["base"] = diagnose(base, rows)
        results[str(run)] = diagnose(policy, rows)
        saved.write_text(json.dumps({"base": results["base"], "final": results[str(run)]}, indent=1))
    print_table({name: [r] for name, r in results.items()})
    if args.by_config:
        groups = {"base": [results["base"]]}
        for run in args.runs:
            groups.setdefault(run.parent.name, []).append(results[str(run)])
        print("\nmean over each configuration's runs")
        print_table(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
