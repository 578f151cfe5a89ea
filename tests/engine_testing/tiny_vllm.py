"""The tiny Qwen2.5-VL checkpoint the vLLM tests run, and the HF log-probs they compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from visurf_engine.models import attention
from visurf_engine.models.hf import ImageOnlyProcessor, image_processor_for
from visurf_engine.models.policy import Batching, Policy
from visurf_engine.models.tiny import tiny_config, train_tokenizer
from visurf_engine.rollout.vllm import export_checkpoint
from visurf_engine.tasks.shapes import generator as shapes

PADDED = Batching(pack=False, vision_once=False)


def build_checkpoint(path):
    """Random-init tiny model, its LM head scaled by 10 (peaked next-token distributions, a clear
    greedy choice) and its ``<|im_end|>`` row set along the mean final hidden state (logit about 6),
    so that many sampled completions end before the budget while greedy ones run to it."""
    rows = shapes.make_split(64, seed=11, absent_ratio=0.5)
    tokenizer = train_tokenizer([r.problem for r in rows] + ["<think>The red circle is at row 2.</think><answer>[]</answer>"])
    processor = ImageOnlyProcessor(image_processor_for(shapes.SIZE * shapes.SIZE), tokenizer, chat_template=tokenizer.chat_template)
    torch.manual_seed(0)
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration._from_config(tiny_config(tokenizer), attn_implementation=attention.NAME)
    policy = Policy(model, processor)
    prompts = policy.encode([r.problem for r in rows[:4]], [r.image for r in rows[:4]])
    with torch.no_grad():
        b = policy.collate(prompts, range(4), [[policy.eos_id]] * 4, PADDED)  # the mean over every position
        mean = model.model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                           pixel_values=b.pixel_values, image_grid_thw=b.image_grid_thw).last_hidden_state.mean(dim=(0, 1))
        model.lm_head.weight.mul_(10.0)
        model.lm_head.weight[policy.eos_id] = 6.0 * mean / mean.norm() ** 2
    return export_checkpoint(model, processor, path)


def hf_logprobs(policy, prompts, b, completion, temperature, suppress=True):
    """Per-token log-probs ``[L]`` of ``completion`` after prompt ``b``, from a plain HF forward at
    ``temperature``, the vision tokens masked as vLLM's logit bias masks them (unless ``suppress=False``)."""
    batch = policy.collate(prompts, [b], [completion], PADDED)
    with torch.no_grad():
        logits = policy.completion_hidden(batch) @ policy.lm_head_weight.T
    if suppress:
        logits[:, policy.suppressed] = float("-inf")
    return F.log_softmax(logits / temperature, dim=-1).gather(1, batch.targets[:, None])[:, 0]
