"""The memory report's picture: one stacked bar per method and category, estimated beside measured.

Bars that fit are drawn to scale against the device's size; a method that does not fit is drawn cut off at the top
of the axis, hatched, with its estimate written on it, so one 850 GB bar does not flatten the 40 GB ones.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from qlora.report.markdown import model_name  # noqa: E402

COLORS = {"quantized_weights": "#1d4e89", "unquantized_weights": "#7fb3e6", "gathered_weights": "#4a7fb0",
          "adapters": "#3f9b4a", "gradients": "#f0a030", "optimizer_state": "#d9534f", "activations": "#9b7fd1",
          "cuda_context": "#9e9e9e", "tokenised_rows": "#c8b400", "allocator_cache": "#d4d4d4"}
NAMES = {"quantized_weights": "NF4 base weights + quant state", "unquantized_weights": "16/32-bit weights",
         "gathered_weights": "gathered weights (sharded or streamed base)", "adapters": "LoRA adapters",
         "gradients": "gradients", "optimizer_state": "optimizer state", "activations": "activations & temporaries",
         "cuda_context": "CUDA context", "tokenised_rows": "tokenised rows (host)",
         "allocator_cache": "held by the allocator in no tensor\n(estimated: its margin)"}
DARK = ("quantized_weights", "adapters", "optimizer_state", "activations")
TITLES = {"qlora": "QLoRA\nNF4 base", "lora": "LoRA\n16-bit base", "full": "full\nfine-tuning"}


def _unit(largest: float) -> tuple[float, str]:
    return (2**30, "GiB") if largest >= 2**30 else (2**20, "MiB")


def _bars(report: dict) -> list[dict]:
    """One entry per bar: method, kind (estimated | measured), stacked components, total, fits."""
    bars = []
    for method in [m for m in ("qlora", "lora", "full") if m in report["methods"]]:
        e = report["methods"][method]
        margin = e.get("allocator_margin_bytes") or 0  # what the card holds beside the peak, as measured bars show
        bars.append({"method": method, "kind": "estimated", "parts": {**e["components"], "allocator_cache": margin},
                     "total": e["estimated_peak_bytes"] + margin,  # the card's bar: the card alone, not the host
                     "fits": e["estimated_peak_bytes"] + margin <= report["device_memory_bytes"]})
        if e.get("measured_peak_bytes"):
            bars.append({"method": method, "kind": "measured", "parts": e["measured_components"],
                         "total": e["measured_peak_bytes"], "fits": True, "error": e["error"]})
        elif report["measured"]:
            bars.append({"method": method, "kind": "measured", "parts": {}, "total": 0, "fits": e["fits"],
                         "note": "not measured:\ndoes not fit" if not e["fits"] else "not measured"})
    return bars


def plot_report(report: dict, path: Path) -> None:
    bars = _bars(report)
    device = report["device_memory_bytes"]
    fitting = [b["total"] for b in bars if b["fits"] and b["total"]] or [device]
    top = 1.25 * max(fitting)
    show_device = device <= 2.5 * top  # a 24 GiB RAM line beside 10 MiB bars would only squash them
    if show_device:
        top = max(top, 1.25 * device)
    scale, unit = _unit(top)

    fig, ax = plt.subplots(figsize=(10, 5.6), dpi=150)
    xs, x, ticks, labels = [], 0.0, [], []
    for i, bar in enumerate(bars):
        if i and bar["method"] != bars[i - 1]["method"]:
            x += 0.55  # a gap between methods
        xs.append(x)
        x += 1.0
    for x, bar in zip(xs, bars, strict=True):
        # A bar taller than the axis is drawn shrunk to fit, hatched and labelled: its make-up stays readable.
        clipped = bar["total"] > top
        shrink = (1.1 * device if show_device else 0.9 * top) / bar["total"] if clipped else 1.0
        bottom = 0.0
        for cat, color in COLORS.items():
            height = (bar["parts"].get(cat, 0) or 0) * shrink
            if height <= 0:
                continue
            ax.bar(x, height / scale, 0.8, bottom=bottom / scale, color=color, edgecolor="white", linewidth=0.6,
                   hatch="//" if clipped else None, alpha=0.9 if bar["kind"] == "measured" else 1.0)
            if height > 0.045 * top:  # name the big blocks on the bar itself
                ax.text(x, (bottom + height / 2) / scale, _num(bar["parts"][cat] / scale), ha="center",
                        va="center", fontsize=7, color="white" if cat in DARK else "#222222")
            bottom += height
        if clipped:
            ax.text(x, bottom / scale + top / scale * 0.01, f"{bar['total'] / scale:,.0f} {unit}: does not fit "
                    f"in {device / scale:,.0f} {unit}\n(drawn at 1/{1 / shrink:,.0f} scale)", ha="center", va="bottom",
                    fontsize=8, fontweight="bold", color="#7a1212")
        elif bar.get("note"):
            ax.text(x, top / scale * 0.02, bar["note"], ha="center", va="bottom", fontsize=8, color="#555555")
        elif bar["total"]:
            ax.text(x, bar["total"] / scale + top / scale * 0.01, f"{_num(bar['total'] / scale)} {unit}",
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
        if "error" in bar:
            ax.text(x - 0.5, max(bar["total"], bars[xs.index(x) - 1]["total"]) / scale + top / scale * 0.06,
                    f"estimate {100 * bar['error']:+.1f}%", ha="center", va="bottom", fontsize=8, color="#333333")
        ticks.append(x)
        labels.append(bar["kind"] if report["measured"] else "estimated")
    ax.set_xticks(ticks, labels, fontsize=8)
    for method in dict.fromkeys(b["method"] for b in bars):
        centre = sum(x for x, b in zip(xs, bars, strict=True) if b["method"] == method) / \
            sum(1 for b in bars if b["method"] == method)
        ax.text(centre, -0.09, TITLES[method], transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=10, fontweight="bold")
    handles, names = [], []
    if show_device:
        handles.append(ax.axhline(device / scale, color="#222222", linestyle="--", linewidth=1))
        names.append(f"{report['device_memory']}: {device / scale:,.1f} {unit}")
    ax.set_ylim(0, top / scale)
    ax.set_ylabel(unit)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.25)
    s = report["settings"]
    where = f"measured on {report['device']}" if report["measured"] else \
        f"estimate only, for {report['estimate_for'].upper()} with {s['compute_dtype']} compute: nothing measured"
    ax.set_title(f"{model_name(report['model'])}: peak memory of one training step, by what holds it\n"
                 f"batch {s['batch_size']} x {s['seq_len']} tokens, LoRA r={s['lora_r']} on "
                 f"{','.join(s['lora_targets'])}, {s['optimizer']}, checkpointing "
                 f"{'on' if s['gradient_checkpointing'] else 'off'}\n{where}", fontsize=9.5)
    used = [c for c in COLORS if any((b["parts"].get(c) or 0) > 0 for b in bars)]
    ax.legend(handles + [Patch(color=COLORS[c]) for c in reversed(used)],
              names + [NAMES[c] for c in reversed(used)], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.76, bottom=0.2, top=0.86)
    fig.savefig(path)
    plt.close(fig)


def _num(x: float) -> str:
    return f"{x:,.2f}" if x < 10 else f"{x:,.1f}"
