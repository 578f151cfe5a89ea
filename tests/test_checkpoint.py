"""Checkpoints of models whose weights share storage (tied input/output embeddings, as in
Qwen2.5-VL-3B): written once, restored exactly, and still tied after loading."""

import torch

from visurf_engine import checkpoint as ckpt


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    model, other = Tied(), Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.head(model.embed(torch.tensor([1, 4, 9]))).square().sum().backward()
    opt.step()
    tmp = ckpt.save_checkpoint(tmp_path, 1, model, opt.state_dict(), {"step": 1})
    ckpt.save_rng(tmp, 0)
    final = ckpt.commit_checkpoint(tmp_path, 1)
    assert ckpt.latest_checkpoint(tmp_path) == final
    state, optimizer_state = ckpt.load_checkpoint(final, other)
    torch.optim.AdamW(other.parameters(), lr=1e-2).load_state_dict(optimizer_state)
    assert state == {"step": 1}
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight.data_ptr() == other.embed.weight.data_ptr()  # still one tensor
