"""Pictures and plots for people: colour-mapped depth, score histograms, selection shares, curves.

Everything renders with matplotlib's Agg backend to PNG bytes and is written through the run root,
so plots land next to the outputs they describe, on any filesystem.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.layout import score_plot
from pipeline.storage import Root  # noqa: E402

CMAP = "Spectral_r"  # perceptual, diverging: near = warm, far = cool (as Depth Anything's demos)


def colorize(disp: np.ndarray, lo: float | None = None, hi: float | None = None, cmap: str = CMAP) -> np.ndarray:
    """Disparity → (H,W,3) uint8 with a perceptual colour map; 2–98 % range unless given; NaN → black."""
    d = np.asarray(disp, dtype=np.float64)
    finite = np.isfinite(d)
    if lo is None or hi is None:
        vals = d[finite]
        lo, hi = (np.percentile(vals, [2, 98]) if vals.size else (0.0, 1.0))
    x = np.clip((d - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    rgb = (plt.get_cmap(cmap)(np.nan_to_num(x))[..., :3] * 255).astype(np.uint8)
    rgb[~finite] = 0
    return rgb


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_plots(root: Root, scores: pa.Table, selection: dict) -> None:
    rows = scores.to_pylist()
    teachers = sorted({r["teacher"] for r in rows})
    metrics = ["lg_consistency", "agreement", "valid_fraction"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.2))
    for ax, m in zip(axes, metrics):
        for t in teachers:
            vals = [r[m] for r in rows if r["teacher"] == t and r[m] is not None and np.isfinite(r[m])]
            if vals:
                ax.hist(vals, bins=20, alpha=0.55, label=t)
        ax.set_title(m)
        ax.set_xlabel("lower is better" if m != "valid_fraction" else "higher is better")
    axes[0].legend()
    root.write_bytes(png_bytes(fig), *score_plot("metrics_hist.png"))
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    share = selection["share"]
    ax.bar(list(share), list(share.values()), color="#4c72b0")
    ax.set_ylabel("mean selection probability")
    ax.set_title(f"selection share ({selection['policy']})")
    root.write_bytes(png_bytes(fig), *score_plot("selection_share.png"))


def line_plot(series: dict[str, tuple[list[float], list[float]]], title: str, ylabel: str, log_y: bool = False) -> bytes:
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend()
    return png_bytes(fig)
