"""Pictures of the monitoring figures (matplotlib, rendered to PNG data URIs for the admin page
and the self-contained monthly report)."""

from __future__ import annotations

import base64
import io


def _figure(width: float = 6.4, height: float = 2.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(width, height), dpi=100)


def _png(plt, fig) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def referral_rates(windows) -> str:
    """High-risk referral rate per window against the band the bundle's validation predicts,
    with the PPV where outcomes are known."""
    plt, fig, ax = _figure()
    labels = [w.start.strftime("%d %b") for w in windows]
    x = list(range(len(windows)))
    low = [w.band[0] if w.band else None for w in windows]
    high = [w.band[1] if w.band else None for w in windows]
    if any(v is not None for v in low):
        ax.fill_between(x, [v or 0 for v in low], [v or 0 for v in high], color="#cfe3f7", label="expected band")
    ax.plot(x, [w.high_risk_rate for w in windows], marker="o", color="#1f4e79", label="high-risk referral rate")
    ax.plot(x, [w.ppv for w in windows], marker="s", linestyle="--", color="#a33", label="PPV (outcomes)")
    ax.set_xticks(x, labels, rotation=45, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.legend(fontsize=8, loc="upper left")
    return _png(plt, fig)


def score_distribution(scores, histogram: dict | None) -> str:
    """The observed scores against the bundle's held-out score histogram (shares per bin)."""
    import numpy as np

    plt, fig, ax = _figure()
    if histogram:
        edges = np.asarray(histogram["edges"], dtype=float)
        ref = np.asarray(histogram["counts"], dtype=float)
        centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        ax.bar(centres, ref / max(ref.sum(), 1), width=width * 0.9, color="#bbb", label="validation")
        if len(scores):
            seen, _ = np.histogram(np.clip(scores, 0, 1), bins=edges)
            ax.step(
                edges[:-1],
                seen / max(seen.sum(), 1),
                where="post",
                color="#1f4e79",
                label=f"observed (n={len(scores)})",
            )
    ax.set_xlabel("calibrated score")
    ax.set_ylabel("share of studies")
    if histogram:
        ax.legend(fontsize=8)
    return _png(plt, fig)


def drift_bars(drift: dict, limit: float) -> str:
    """PSI per tracked feature, with the drift line."""
    plt, fig, ax = _figure(height=2.4)
    names = [k for k, v in drift.items() if v is not None]
    values = [drift[k] for k in names]
    ax.barh(names, values, color=["#a33" if v > limit else "#1f4e79" for v in values])
    ax.axvline(limit, color="#a33", linestyle="--", linewidth=1)
    ax.set_xlabel("population stability index")
    return _png(plt, fig)


def monitoring_pictures(weeks, window, bundle, drift_limit: float) -> dict:
    """The pictures of a monitoring view (the page and the monthly report): the weekly referral
    rates, the window's scores against the deciding bundle's validation histogram, and the drift
    bars when any feature could be compared."""
    histogram = ((bundle.manifest or {}).get("metrics") or {}).get("score_histogram") if bundle else None
    return {
        "rates": referral_rates(weeks),
        "scores": score_distribution(window.scores, histogram),
        "drift": drift_bars(window.drift, drift_limit) if any(v is not None for v in window.drift.values()) else None,
    }
