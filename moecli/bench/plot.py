"""Pictures of `bench --simulate`: time per token (TBT, decode) and time to first token (TTFT, prefill) of each
placement against the cache ratio, the oracle as a dashed line (the bound); a PNG through matplotlib, or a plot in
the terminal through plotext."""
from __future__ import annotations

from pathlib import Path

from moecli.errors import MoecliError

PANELS = (("tbt_ms", "TBT ms (decode, per token)"), ("ttft_ms", "TTFT ms (prefill)"))


def series(out: dict, metric: str) -> tuple[list[float], dict[str, list[float | None]]]:
    """(cache ratios, policy -> values in that order), policies in the order the sweep ran them."""
    keys = list(out["results"])
    ratios = [float(k) for k in keys]
    policies = list(dict.fromkeys(p for row in out["results"].values() for p in row))
    return ratios, {p: [out["results"][k].get(p, {}).get(metric) for k in keys] for p in policies}


def png_plot(out: dict, path: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoecliError("--plot FILE.png needs matplotlib: pip install matplotlib") from None
    panels = [(m, t) for m, t in PANELS if any(v is not None for vs in series(out, m)[1].values() for v in vs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (metric, title) in zip(axes[0], panels):
        ratios, by_policy = series(out, metric)
        for name, values in by_policy.items():
            pts = [(r, v) for r, v in zip(ratios, values) if v is not None]
            if not pts:
                continue
            style = dict(color="black", linestyle="--", linewidth=2) if name == "oracle" else dict(marker="o")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, **style)
        ax.set_xlabel("device expert cache ratio")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{out['model_geometry']} {out['quant']} on {out['profile']} (simulated)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def terminal_plot(out: dict, width: int | None = None) -> str:
    """The same panels as text (plotext: its 6.x API, or 5.x's pyplot-like one)."""
    try:
        import plotext as plt
    except ImportError:
        raise MoecliError("--plot - needs plotext: pip install plotext") from None
    import shutil

    width = width or min(shutil.get_terminal_size((80, 24)).columns, 100)
    parts = []
    for metric, title in PANELS:
        ratios, by_policy = series(out, metric)
        lines = {name: [(r, v) for r, v in zip(ratios, values) if v is not None] for name, values in by_policy.items()}
        lines = {name: pts for name, pts in lines.items() if pts}
        if not lines:
            continue
        heading = f"{title}: {out['model_geometry']} on {out['profile']} (x: cache ratio)"
        parts.append(_plotext_v6(plt, lines, heading, width) if hasattr(plt, "figure") and
                     hasattr(plt.figure, "signal") else _plotext_v5(plt, lines, heading, width))
    return "\n".join(parts)


def _plotext_v6(plt, lines: dict, heading: str, width: int) -> str:
    fig = plt.figure
    fig.clear()
    fig.plot_size(width, 20)
    fig.theme("clear")  # no colour codes: the text pipes and reads anywhere
    for name, pts in lines.items():
        fig.draw(fig.signal([p[0] for p in pts], [p[1] for p in pts]).lines().label(name))
    fig.title(heading)
    text = str(fig.build())  # a plotext matrix: its text is the plot
    fig.clear()
    return text


def _plotext_v5(plt, lines: dict, heading: str, width: int) -> str:  # pragma: no cover - plotext 5.x
    plt.clf()
    plt.plotsize(width, 20)
    plt.theme("clear")
    for name, pts in lines.items():
        plt.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
    plt.title(heading)
    return plt.build()
