"""``scripts/diagnose_collapse.py``'s decision point: the token that decides between "no object"
and a box, read from the tokenizer (merged tags or atomic tags), never hard-coded."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from visurf_engine.models.tiny import train_tokenizer
from visurf_engine.rewards import get_reward
from visurf_engine.tasks.shapes.base_model import POLICY_STYLE, TAGS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ['<think>the red square</think><answer>[{"bbox_2d": [10, 2, 33, 4]}]</answer>',
          "<think></think><answer>[]</answer>", '<think></think><answer>[{"bbox_2d": [7, 1, 5, 9]}]</answer>'] * 20  # fmt: skip


def diagnose_collapse():
    spec = importlib.util.spec_from_file_location("diagnose_collapse", ROOT / "scripts" / "diagnose_collapse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("atomic", [(), TAGS], ids=["merged", "atomic"])
def test_decision_tokens_are_where_an_empty_and_a_box_answer_part(atomic):
    tok, spec = train_tokenizer(CORPUS, atomic=atomic), get_reward("grounding")
    box = [{"bbox_2d": [3, 4, 20, 30]}]
    empty_id, box_id = diagnose_collapse().decision_tokens(tok, spec, box)
    ids = {name: tok(spec.render(s, POLICY_STYLE), add_special_tokens=False)["input_ids"] for name, s in (("e", []), ("b", box))}
    at = ids["e"].index(empty_id)
    assert empty_id != box_id and ids["b"][at] == box_id and ids["e"][:at] == ids["b"][:at]
    assert "[]" in tok.convert_ids_to_tokens(empty_id) and "[{" in tok.convert_ids_to_tokens(box_id)
    if atomic:  # the tags are tokens of their own: the decision is the answer's first token, right after <answer>
        assert tok.convert_ids_to_tokens(ids["e"][at - 1]) == "<answer>"
