"""Test fixtures of the engine (not installed): ``megatron`` (the spawned megatron-backend tests),
``runs`` (the tiny end-to-end settings, test rewards and fault paradigms, runs in a fresh
process) and ``train`` (the entry point those runs use, with a SIGKILL injectable)."""
