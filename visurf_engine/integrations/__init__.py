"""ViSurf and the fused loss inside other RL stacks (``docs/embedding.md``).

- ``integrations.trl``: ``ViSurfGRPOTrainer``, a subclass of TRL's ``GRPOTrainer``;
- ``integrations.verl``: verl's ``visurf`` policy loss and advantage estimator, the gold
  injection around its rollout manager, and a fused-kernel forward patch.

Each stack is imported only by its own module: the engine imports without TRL or verl.
"""
