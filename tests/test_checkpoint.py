"""Checkpoints of models whose weights share storage (tied input/output embeddings, as in
Qwen2.5-VL-3B), through the learner's checkpoint format (``Learner.save_state``): written once,
restored exactly with the optimizer state, and still tied after loading."""

from types import SimpleNamespace

import torch

from visurf_engine import checkpoint as ckpt
from visurf_engine.learners import Learner
from visurf_engine.parallel.world import World


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


class TiedLearner(Learner):
    """The default (whole-model) checkpoint format over ``Tied``; nothing else is used."""

    def __init__(self):
        self.policy = SimpleNamespace(model=Tied())
        self.optimizer = torch.optim.AdamW(self.policy.model.parameters(), lr=1e-2)

    forward_backward = logprobs = clip_grads = zero_grads = export_weights = load_weights = None


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    learner, other = TiedLearner(), TiedLearner()
    model = learner.policy.model
    model.head(model.embed(torch.tensor([1, 4, 9]))).square().sum().backward()
    learner.optimizer.step()
    ckpt.save(tmp_path, 1, learner, {"step": 1}, World())
    final = ckpt.latest_checkpoint(tmp_path)
    assert final == tmp_path / "step_000001" and not list(tmp_path.glob("*.tmp"))
    assert ckpt.load_checkpoint(final, other) == {"step": 1}
    restored = other.policy.model
    assert torch.equal(restored.embed.weight, model.embed.weight)
    assert restored.head.weight.data_ptr() == restored.embed.weight.data_ptr()  # still one tensor
    a, b = learner.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)
