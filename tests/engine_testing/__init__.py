"""Test fixtures of the engine (not installed): ``megatron`` (the spawned megatron-backend tests)."""
