"""Looking at an exit trace: a summary table, and PNGs (matplotlib, imported only here).

Three pictures per trace: how long exits of each kind kept the vCPU out of the guest (the
handler time, and the round trip to the vCPU's next exit), a timeline of the exits, and the
guest addresses that exit most (symbolized with the guest's ELF symbols where the trace
kept them). ``hvjit trace show|plot FILE`` and ``hvjit bench exits --plot DIR`` use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .abi import VmExitCode
from .errors import HvjitError
from .kernels.tracering import TRACE_DTYPE
from .trace import exit_name

PLOT_HINT = "pip install 'hvjit[plot]'"
NATIVE_COLOR, PYTHON_COLOR = "#2a7ab9", "#e07b39"
MAX_KINDS = 6  # panels in the latency figure; rarer kinds are grouped as "other"


class PlotUnavailableError(HvjitError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailableError(f"plotting needs matplotlib: {PLOT_HINT}") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


# Exit codes whose records say which way the access went.
_DIRECTED = {VmExitCode.INOUT: ("port in", "port out"), VmExitCode.INOUT_STR: ("port in rep", "port out rep"),
             VmExitCode.INST_EMUL: ("mmio read", "mmio write")}


def kind_labels(records: np.ndarray) -> np.ndarray:
    """Each record's exit kind as text: its exit code's name, or for port IO and MMIO the
    direction ("port out", "mmio read", ...)."""
    out = np.empty(records.size, dtype=object)
    for code in np.unique(records["exitcode"]):
        sel = records["exitcode"] == code
        if int(code) in _DIRECTED:
            read, write = _DIRECTED[VmExitCode(int(code))]
            out[sel] = np.where(records["is_write"][sel] != 0, write, read)
        else:
            out[sel] = exit_name(code).lower()
    return out


def _kinds_by_count(labels: np.ndarray, limit: int = MAX_KINDS) -> list[str]:
    kinds, counts = np.unique(labels, return_counts=True) if labels.size else (np.array([]), np.array([]))
    return [str(k) for k in kinds[np.argsort(-counts, kind="stable")][:limit]]


def round_trips(records: np.ndarray) -> np.ndarray:
    """ns from each exit to the same vCPU's next one; -1 where there is none (a vCPU's last
    exit, or a suspend, after which the guest stopped)."""
    out = np.full(records.size, -1, np.int64)
    for v in np.unique(records["vcpu"]):
        at = np.flatnonzero(records["vcpu"] == v)
        ns = records["ns"][at]
        if at.size > 1 and (ns >= 0).all():
            out[at[:-1]] = np.diff(ns)
    out[records["exitcode"] == VmExitCode.SUSPENDED] = -1
    return out


def _site_name(rip: int, meta: dict) -> str:
    name = meta.get("symbols", {}).get(str(rip), "")
    return f"{name} ({rip:#x})" if name else f"{rip:#x}"


def top_sites(records: np.ndarray, meta: dict, top: int = 15) -> list[tuple[str, int, str]]:
    """(site, exits, kinds) for the rips with the most exits."""
    valid = records[records["rip_valid"] != 0]
    if not valid.size:
        return []
    rips, counts = np.unique(valid["rip"], return_counts=True)
    order = np.argsort(-counts, kind="stable")[:top]
    labels = kind_labels(valid)
    out = []
    for i in order:
        kinds = sorted(set(labels[valid["rip"] == rips[i]]))
        out.append((_site_name(int(rips[i]), meta), int(counts[i]), ",".join(kinds)))
    return out


def _us(ns: np.ndarray) -> np.ndarray:
    return ns.astype(np.float64) / 1000.0


def summary(records: np.ndarray, meta: Optional[dict] = None, top: int = 10) -> str:
    """A plain-text table: exits per kind with handler times, the busiest sites, the span."""
    meta = meta or {}
    if records.dtype != TRACE_DTYPE:
        raise HvjitError("not an hvjit trace (wrong record type)")
    lines = []
    n = records.size
    if not n:
        return "no exits recorded"
    ns = records["ns"]
    span = (int(ns.max()) - int(ns.min())) if (ns >= 0).all() else -1
    vcpus = np.unique(records["vcpu"]).size
    head = f"{n} exits on {vcpus} vCPU{'s' if vcpus > 1 else ''}"
    if span > 0:
        head += f" over {span / 1e6:.3f} ms ({n / (span / 1e9):,.0f} exits/s)"
    if meta.get("dropped"):
        head += f"; {meta['dropped']} older exits were overwritten in the ring"
    lines.append(head)
    labels = kind_labels(records)
    lines.append("")
    lines.append(f"{'kind':18} {'exits':>8} {'native':>7} {'handler us: median':>19} {'p99':>9} {'max':>9}")
    for kind in _kinds_by_count(labels, limit=64):
        sel = records[labels == kind]
        h = sel["handler_ns"][sel["handler_ns"] >= 0]
        med, p99, mx = ((np.median(_us(h)), np.percentile(_us(h), 99), _us(h).max()) if h.size else (np.nan,) * 3)
        lines.append(f"{kind:18} {sel.size:8d} {100 * sel['native'].mean():6.1f}% {med:19.2f} {p99:9.2f} {mx:9.2f}")
    io = records[np.isin(records["exitcode"], (VmExitCode.INOUT, VmExitCode.INOUT_STR, VmExitCode.INST_EMUL))]
    if io.size:
        addrs, counts = np.unique(io["addr"], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        lines.append("")
        lines.append("busiest ports / MMIO addresses: " + ", ".join(
            f"{int(addrs[i]):#x} ({int(counts[i])})" for i in order))
    sites = top_sites(records, meta, top)
    if sites:
        lines.append("")
        lines.append(f"{'exit site':48} {'exits':>8}  kinds")
        for site, count, kinds in sites:
            lines.append(f"{site[:48]:48} {count:8d}  {kinds}")
    return "\n".join(lines)


# ---- pictures -----------------------------------------------------------------------------------

def plot_latency(records: np.ndarray, path, title: str = "") -> Path:
    """Histograms per exit kind: the handler time, and the round trip to the next exit. Each
    row shares its bins, so kinds compare at a glance."""
    plt = _pyplot()
    from matplotlib.ticker import LogFormatterSciNotation, NullFormatter

    labels = kind_labels(records)
    trips = round_trips(records)
    # A suspend ends the run: it has no round trip, and its handler time says little.
    kinds = _kinds_by_count(labels[records["exitcode"] != VmExitCode.SUSPENDED])
    cols = max(len(kinds), 1)
    fig, axes = plt.subplots(2, cols, figsize=(2.9 * cols + 0.6, 5.0), squeeze=False)
    native = records["native"] != 0
    for row, (values, what) in enumerate(((records["handler_ns"], "handler"), (trips, "to the next exit"))):
        shown = values[np.isin(labels, kinds) & (values > 0)]
        if not shown.size:
            continue
        lo, hi = max(_us(shown).min(), 1e-3), max(_us(shown).max(), 1e-2)
        bins = np.logspace(np.log10(lo) - 0.05, np.log10(hi) + 0.05, 40)
        for c, kind in enumerate(kinds):
            ax = axes[row][c]
            sel = (labels == kind) & (values > 0)
            for mask, name, color in ((native, "native", NATIVE_COLOR), (~native, "Python", PYTHON_COLOR)):
                v = _us(values[sel & mask])
                if v.size:
                    ax.hist(v, bins=bins, color=color, alpha=0.75, label=f"{name} ({v.size})")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=True))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7, frameon=False)
            ax.set_title(f"{kind}: {what}" if row == 0 else what, fontsize=9)
            if row == 1:
                ax.set_xlabel("µs", fontsize=8)
            if c == 0:
                ax.set_ylabel("exits", fontsize=8)
    fig.suptitle(title or "exit latency by kind", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_timeline(records: np.ndarray, path, title: str = "") -> Path:
    """Each exit as a tick on its kind's row over time, and the exit rate below."""
    plt = _pyplot()
    labels = kind_labels(records)
    kinds = _kinds_by_count(labels, limit=64)[::-1]
    ns = records["ns"] if (records["ns"] >= 0).all() else records["tsc"]
    t = (ns - ns.min()).astype(np.float64) / 1e6 if records.size else np.zeros(0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 4.6), sharex=True,
                                      gridspec_kw={"height_ratios": [max(len(kinds), 2), 2]})
    for row, kind in enumerate(kinds):
        sel = labels == kind
        native = records["native"][sel] != 0
        y = np.full(sel.sum(), row, np.float64)
        top.scatter(t[sel][native], y[native], s=6, marker="|", color=NATIVE_COLOR, linewidths=0.6)
        top.scatter(t[sel][~native], y[~native] + 0.25, s=6, marker="|", color=PYTHON_COLOR, linewidths=0.6)
    top.set_yticks(range(len(kinds)), kinds, fontsize=8)
    top.set_ylim(-0.6, len(kinds) - 0.2)
    top.scatter([], [], marker="|", color=NATIVE_COLOR, label="native")
    top.scatter([], [], marker="|", color=PYTHON_COLOR, label="Python")
    top.legend(fontsize=7, loc="upper right", frameon=False)
    if t.size:
        bins = np.linspace(0, max(t.max(), 1e-3), 80)
        width = bins[1] - bins[0]
        stacks = [t[labels == k] for k in kinds]
        bottom.hist(stacks, bins=bins, stacked=True, label=kinds, weights=[np.full(s.size, 1e3 / width) for s in stacks])
        bottom.legend(fontsize=6, frameon=False, ncol=min(len(kinds), 6), loc="upper right", reverse=True)
    bottom.set_ylabel("exits/s", fontsize=8)
    bottom.set_xlabel("ms since the first exit" if (records["ns"] >= 0).all() else "TSC ticks / 1e6", fontsize=8)
    bottom.tick_params(labelsize=7)
    top.set_title(title or "exit timeline", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_sites(records: np.ndarray, meta: dict, path, title: str = "", top: int = 15) -> Path:
    """The guest addresses with the most exits (symbolized where the trace has symbols)."""
    plt = _pyplot()
    sites = top_sites(records, meta, top)[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(sites), 3) + 1.2))
    if sites:
        bars = ax.barh(range(len(sites)), [s[1] for s in sites], color=NATIVE_COLOR)
        ax.bar_label(bars, fontsize=7, padding=2)
        ax.set_yticks(range(len(sites)), [f"{s[0]}  [{s[2]}]" for s in sites], fontsize=7, family="monospace")
    else:
        ax.text(0.5, 0.5, "no rip recorded (trace without KVM_CAP_SYNC_REGS)", ha="center", transform=ax.transAxes)
    ax.set_xlabel("exits", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title or "top exit sites", fontsize=10)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_trace(records: np.ndarray, meta: Optional[dict], outdir, prefix: str = "trace") -> list[Path]:
    """The three pictures of one trace as ``<prefix>-latency.png``, ``-timeline.png``, ``-sites.png``."""
    meta = meta or {}
    outdir = Path(outdir)
    name = meta.get("vm", "")
    suffix = f" ({name})" if name else ""
    return [plot_latency(records, outdir / f"{prefix}-latency.png", f"exit latency by kind{suffix}"),
            plot_timeline(records, outdir / f"{prefix}-timeline.png", f"exit timeline{suffix}"),
            plot_sites(records, meta, outdir / f"{prefix}-sites.png", f"top exit sites{suffix}")]


def plot_bench(traces: dict, outdir) -> list[Path]:
    """The pictures of ``hvjit bench exits --plot``: one traced run per exit kind, together."""
    parts = [r for r in traces.values() if r.size]
    records = np.concatenate(parts) if parts else np.zeros(0, TRACE_DTYPE)
    records = records[np.argsort(records["tsc"], kind="stable")]
    return plot_trace(records, {"vm": "bench exits"}, outdir, "bench-exits")
