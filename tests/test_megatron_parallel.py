"""megatron-core TP / PP against the single-process HF model: same weights (through the
converter), same random micro-batches with one image per sequence, one optimizer step.

Spawned gloo processes on CPU run ``MegatronLearner`` (the vision tower on the first stage,
vocab-parallel fused loss on the last, megatron's pipeline schedule, DDP and
``finalize_model_grads``); the parent computes the oracle with transformers' autograd. Checked:
the per-micro-batch losses, every gradient (rank shards gathered into HF names by
``megatron_to_hf``), the global grad norm, and the weights after the clipped AdamW step
exported back into the HF model on every rank. float32 throughout; tolerances below (the
two sides sum in different orders: fused QKV / split heads, chunked vocab-parallel softmax).
The PP=2 case ties the embeddings (the last stage's copy is reduced by
``finalize_model_grads``); the vocabulary (301) is odd, so TP pads it.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from engine_testing.megatron import hf_oracle, parallel_worker, random_micro_batches, tiny_vl_model  # noqa: E402
from visurf_engine.learners.megatron.convert import Layout, megatron_to_hf  # noqa: E402

# float32: losses and gradients relative to their scale; weights after one AdamW step (lr 1e-3)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_RTOL = 1e-5  # max |g - g_ref| / max |g_ref|, per tensor
WEIGHT_ATOL = 1e-4  # 10% of one Adam step: tiny gradients amplify rounding through g / sqrt(v)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "tp,pp,tied", [(2, 1, False), (1, 2, True), (2, 2, False)], ids=["tp2", "pp2-tied", "tp2xpp2"]
)
def test_parallel_step_equals_single_process_hf(tmp_path, tp, pp, tied):
    world = tp * pp
    mp.start_processes(
        parallel_worker, args=(world, _free_port(), str(tmp_path), tp, pp, tied), nprocs=world, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    model = tiny_vl_model(tied=tied)
    ref = hf_oracle(model, random_micro_batches(model))
    lay = Layout.from_hf_config(model.config, tp, pp)
    # rank = tp_rank + tp * pp_rank; the last stage computes the loss, every stage reports it
    for r in ranks:
        torch.testing.assert_close(r["losses"], ref["losses"], **LOSS_TOL)
        assert r["norm"] == pytest.approx(ref["norm"], rel=GRAD_RTOL)
    grads = {}
    for p in range(pp):
        grads |= megatron_to_hf([ranks[p * tp + t]["grads"] for t in range(tp)], lay, p)
    assert set(ref["grads"]) <= set(grads)
    for k, g in ref["grads"].items():
        err = (grads[k] - g).abs().max() / g.abs().max()
        assert err < GRAD_RTOL, f"{k}: relative error {err:.2e}"
    for r in ranks:  # the exported (gathered) weights, identical on every rank
        assert set(r["weights"]) == set(ref["weights"])
        for k, w in ref["weights"].items():
            torch.testing.assert_close(r["weights"][k], w, rtol=0, atol=WEIGHT_ATOL, msg=k)
