"""How a step's cost grows with a swept setting: fitted growth and the plot (``throughput.py --sweep``).

``fit_growth(x, y)`` fits two laws by least squares to one phase's cost ``y`` (median seconds,
or peak GiB) at the swept values ``x``:

- linear, ``y = a + b x`` (with its R^2): a constant part plus a part proportional to x;
- power, ``y = c x^k`` (least squares on ``log y = log c + k log x``, points with y > 0): k = 1
  is proportional growth, k < 1 sub-linear (a fixed cost amortised), k > 1 super-linear;

and the local exponent of each segment between neighbouring points, ``k_i = log(y_{i+1} / y_i)
/ log(x_{i+1} / x_i)``. ``bend`` names the point where the local exponent changes the most, if
it changes there by ``BEND`` or more (None otherwise, or with fewer than three points): where
the growth bends.

``plot_sweep`` draws, for one swept key, time per phase (left) and peak memory per phase
(right) against the swept value: time on log-log axes (a power law is a straight line there),
memory on a linear one (on CPU it is mostly the process's resident weights and heap).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

BEND = 0.25  # change of the local exponent that counts as a bend


def fit_growth(x: Sequence[float], y: Sequence[float]) -> dict:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    out: dict = {}
    if len(x) >= 2 and np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
        resid = y - (a + b * x)
        ss = float(((y - y.mean()) ** 2).sum())
        out["linear"] = {"a": float(a), "b": float(b), "r2": 1 - float((resid**2).sum()) / ss if ss > 0 else 1.0}
    pos = (x > 0) & (y > 0)
    if pos.sum() >= 2 and np.ptp(x[pos]) > 0:
        k, logc = np.polyfit(np.log(x[pos]), np.log(y[pos]), 1)
        out["power"] = {"c": float(math.exp(logc)), "k": float(k)}
    local = [math.log(y1 / y0) / math.log(x1 / x0) if min(x0, x1, y0, y1) > 0 and x0 != x1 else None
             for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:])]  # fmt: skip
    out["local_exponents"] = local
    changes = [abs(b - a) if a is not None and b is not None else -1.0 for a, b in zip(local[:-1], local[1:])]
    out["bend"] = float(x[1 + int(np.argmax(changes))]) if changes and max(changes) >= BEND else None
    return out


def describe(fit: dict) -> str:
    """One line: the power-law exponent, the local exponents, the linear fit's R^2."""
    parts = []
    if "power" in fit:
        parts.append(f"~x^{fit['power']['k']:.2f}")
    local = [f"{k:.2f}" if k is not None else "-" for k in fit.get("local_exponents", [])]
    if len(local) > 1:
        parts.append(f"local {', '.join(local)}")
    if "linear" in fit:
        parts.append(f"linear R2 {fit['linear']['r2']:.3f}")
    if fit.get("bend") is not None:
        parts.append(f"bends at {fit['bend']:g}")
    return "; ".join(parts) or "-"


def plot_sweep(path: Path, key: str, xs: Sequence[float], times: dict[str, Sequence[float]],
               memory: dict[str, Sequence[float]], title: str) -> Path:  # fmt: skip
    """Time (s, median) and peak memory (GiB) per phase against ``key``'s values, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, series, label in ((axes[0], times, "seconds per step (median)"), (axes[1], memory, "peak memory (GiB)")):
        for name, ys in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None and y > 0]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, lw=2.2 if name == "step" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log" if ax is axes[0] else "linear")
        ax.set_xticks(list(xs), [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
