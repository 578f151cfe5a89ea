"""The policy on megatron-core (``model.backend=megatron``): ``convert`` (HF <-> Megatron
weights, pure tensor maps), ``model`` (one pipeline stage of Qwen2(.5)-VL), ``learner``
(schedules, DDP, optimizer, weight export), ``testing`` (fixtures for the spawned tests).
Only ``convert`` and ``testing`` import without megatron-core."""
