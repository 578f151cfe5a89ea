"""Evaluation. ``metrics`` holds the metric math (gIoU, cIoU, N-Acc, bbox_acc, rates),
``probe`` the forgetting probe's scoring, ``evaluate`` the greedy evaluation loops and the table.

``visurf_engine.rewards`` imports ``eval.metrics``, so this ``__init__`` must not import
``rewards`` (that would be an import cycle).
"""
