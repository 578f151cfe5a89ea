"""Evaluation: greedy completions of held-out rows scored by the task's metrics, and the table
(``evaluate``). The metric math lives with the reward families (``rewards.metrics``) and the
embedded task's forgetting probe with the task (``tasks.shapes.probe``)."""
