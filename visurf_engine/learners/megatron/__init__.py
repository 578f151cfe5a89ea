"""The policy on megatron-core (``model.backend=megatron``): ``convert`` (HF <-> Megatron
weights, pure tensor maps), ``model`` (one pipeline stage of Qwen2(.5)-VL), ``learner``
(the learner protocol: schedules, DDP, optimizer, weight export). Only ``convert`` imports
without megatron-core."""
