"""Reporting: machine information, the Markdown table, the JSON file and the speedup plot."""

import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

import fastreg
from bench import contenders
from bench.contenders import BYTE_MODEL, FWD_BWD, LAMBDA, METRIC_PROX, MODES, PROX

MARKDOWN_FILE, JSON_FILE, PLOT_FILE = "results.md", "results.json", "speedup.png"
PENALTY_TITLES = {
    "l2": "Σw²",
    "l1": "Σ|w|",
    "group-rows": "Σ‖rows‖ + Σw² (group lasso, groups along dim 0)",
    "group-cols": "Σ‖columns‖ + Σw² (group lasso, groups along dim 1: strided)",
    "l2-center": "Σ(w - c)² (L2-SP, toward reference weights c)",
    "l2-2-settings": "Σ_i 2^-(i mod 2)·Σw_i² (2 param groups in one Penalty; vs one Penalty per setting)",
    "l2-10-settings": "Σ_i 2^-(i mod 10 mod 4)·Σw_i² (10 param groups in one Penalty; vs one Penalty per setting)",
    "metric-prox-l1": "one proximal step of Σ|w| in Adam's metric D: w ← sign(w)·max(D·|w| − lr·λ, 0)/D",
    "metric-prox-l2-center": "one proximal step of Σ(w - c)² in Adam's metric D: w ← c + D·(w - c)/(D + 2·lr·λ)",
}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_model()}"


def device_slug(device):
    """A short file-name-safe name of the device, e.g. ``cpu-amd-epyc``, ``nvidia-h100-80gb-hbm3``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_model()}"
    name = re.sub(r"\((r|tm)\)|\bprocessor\b|\bcpu @.*", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _package_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit():
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_average():
    """The 1-minute load average: above the core count, other jobs were competing for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def machine_info(device):
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_average(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _package_version("triton"),
        "fastreg": getattr(fastreg, "__version__", None),
        "fastreg_backends": fastreg.available_backends(),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


# -- numbers as text ------------------------------------------------------------------------

def _ms(x):
    if x is None:
        return ""
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def _gbps(x):
    return "" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def _speedup(x):
    return "" if x is None else f"{x:.3g}x"


def _share(x):
    return "" if x is None else f"{x:.0%}"


def _err(x):
    if x is None:
        return ""
    return "0" if x == 0 else f"{x:+.1e}"


def _abs_err(x):
    if x is None:
        return ""
    return "0" if x == 0 else f"{x:.1e}"


def add_derived(rows):
    """Fill ``gbps``, ``speedup_vs_seed`` (same case, penalty and mode; add_to_grad_ is fwd+bwd)
    and ``of_flat_sum`` (GB/s / the flat torch.sum's GB/s, same case, penalty and mode)."""
    seed = {(r["case"], r["penalty"], r["mode"]): r["median_ms"]
            for r in rows if r["is_baseline"] and r["median_ms"] is not None}
    for r in rows:
        ms = r["median_ms"]
        r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9 if ms else None
        base = seed.get((r["case"], r["penalty"], r["mode"]))
        r["speedup_vs_seed"] = base / ms if base and ms else None
    flat = {(r["case"], r["penalty"], r["mode"]): r["gbps"] for r in rows if r["contender"] == "flat-sum" and r["gbps"]}
    for r in rows:
        reference = flat.get((r["case"], r["penalty"], r["mode"]))
        r["of_flat_sum"] = r["gbps"] / reference if reference and r["gbps"] else None
    return rows


def _grouped(rows, penalty):
    """(case, contender) -> {mode: row}, in run order."""
    grouped = {}
    for r in rows:
        if r["penalty"] == penalty:
            grouped.setdefault((r["case"], r["contender"]), {})[r["mode"]] = r
    return grouped


def markdown(rows, meta, cases, penalties):
    lines = [
        f"# fastreg penalty benchmark: {meta['device_name']}, {meta['dtype']}"
        + ("" if meta.get("grad_dtype", "same") == "same" else f" weights, {meta['grad_dtype']} gradients"),
        "",
        f"- {meta['date']}, `{meta['command']}`",
        f"- {meta['cpu_model']}, {meta['cpu_cores']} cores ({meta['torch_threads']} torch threads; load average "
        f"{meta['load_average_at_start']} at start, {meta.get('load_average_at_end')} at end); "
        f"torch {meta['torch']}, triton {meta['triton']}, fastreg {meta['fastreg']} "
        f"(backends: {', '.join(meta['fastreg_backends'])})",
        f"- penalty = {LAMBDA:g} x: " + "; ".join(f"{k}: {v}" for k, v in PENALTY_TITLES.items())
        + "; parameters N(0, 0.02), p.grad preallocated (the autograd engine accumulates in place)",
        "- median of timed calls after warm-up; budget: " + ", ".join(f"{k}={v}" for k, v in meta["budget"].items()),
        "- GB/s = bytes moved / median time, bytes moved:",
        *(f"  - {k}: {v}" for k, v in BYTE_MODEL.items()),
        "- x seed: the baseline's median / this median, same penalty and mode (add_to_grad_ vs its fwd+bwd); the "
        "baseline is the seed article's loop for l2 / l1, the hand-written loop for the group and center terms",
        "- rel err: (value - exact) / exact, exact computed in float64; grad err: max|p.grad - exact| / max|exact|",
        (f"- metric-prox-*: one proximal step in Adam's metric D = √(v / (1 - β₂ᵗ)) + ε (v = g², g ~ N(0, "
         f"{contenders.ADAM_GRAD_STD:g}); β₂ = {contenders.ADAM_BETA2}, t = {contenders.ADAM_STEP}, ε = "
         f"{contenders.ADAM_EPS:g}), lr = {contenders.METRIC_LR:g}, each contender on its own copy of the weights "
         "(every call steps again, as training would); of torch.sum: GB/s / the flat torch.sum's over the same bytes; "
         "x loop: the hand loop's median / this median; prox err: max|w - exact| / max|exact| after the first step, "
         "exact in float64"),
        "",
        "| case | tensors | params |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c.title} | {c.num_tensors:,} | {c.num_elements:,} |" for c in cases]
    titles = {c.name: c.title for c in cases}
    # On a GPU the host's own time per call (launching, not waiting) is worth its column: it
    # bounds the step rate of small models. On a CPU it is the time itself.
    host = meta["device"].startswith("cuda")
    if host:
        lines.insert(lines.index("| case | tensors | params |") - 1,
                     "- host µs: the host's time inside one call (Python and launches), without waiting for the GPU")
    for penalty in penalties:
        if penalty in METRIC_PROX:
            lines += _prox_section(rows, penalty, titles, host)
            continue
        lines += [
            "",
            f"## {penalty}: {PENALTY_TITLES[penalty]}",
            "",
            "| case | contender | fwd ms | fwd GB/s | fwd x seed | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd x seed "
            + ("| host µs fwd / fwd+bwd " if host else "") + "| rel err | grad err | notes |",
            "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if host else "") + "---:|---:|---|",
        ]
        for (case, _), by_mode in _grouped(rows, penalty).items():
            any_row = next(iter(by_mode.values()))
            cells = [titles.get(case, case), any_row["label"]]
            for mode in MODES:
                r = by_mode.get(mode)
                cells += ["", "", ""] if r is None else [_ms(r["median_ms"]), _gbps(r["gbps"]), _speedup(r["speedup_vs_seed"])]
            notes = []
            for r in by_mode.values():
                if r["setup_s"] is not None:
                    notes.append(f"compile {r['setup_s']:.1f} s")
                if r["skipped"]:
                    notes.append(f"skipped: {r['skipped']}")
            grad_err = by_mode[FWD_BWD]["grad_err"] if FWD_BWD in by_mode else None
            if host:
                cells.append(" / ".join(f"{by_mode[m]['host_ms'] * 1e3:.0f}" if by_mode.get(m) and
                                        by_mode[m].get("host_ms") else "-" for m in MODES))
            cells += [_err(any_row["rel_err"]), _abs_err(grad_err), "; ".join(dict.fromkeys(notes))]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _prox_section(rows, penalty, titles, host):
    """The table of a metric prox term: one mode, against the hand loop and torch.sum."""
    lines = [
        "",
        f"## {penalty}: {PENALTY_TITLES[penalty]}",
        "",
        "| case | contender | ms | GB/s | of torch.sum | x loop " + ("| host µs " if host else "") + "| prox err | notes |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if host else "") + "---:|---|",
    ]
    for (case, _), by_mode in _grouped(rows, penalty).items():
        r = by_mode.get(PROX)
        if r is None:
            continue
        cells = [titles.get(case, case), r["label"], _ms(r["median_ms"]), _gbps(r["gbps"]), _share(r.get("of_flat_sum")),
                 _speedup(r["speedup_vs_seed"])]
        if host:
            cells.append(f"{r['host_ms'] * 1e3:.0f}" if r.get("host_ms") else "-")
        cells += [_abs_err(r.get("prox_err")), f"skipped: {r['skipped']}" if r["skipped"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_json(path, meta, cases, references, rows):
    data = {
        "meta": meta,
        "lambda": LAMBDA,
        "byte_model": BYTE_MODEL,
        "cases": [
            {"name": c.name, "title": c.title, "tensors": c.num_tensors, "params": c.num_elements,
             "float64_reference": references.get(c.name)}
            for c in cases
        ],
        "results": rows,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")


def plot_speedups(path, rows, cases, penalties, title):
    """Grouped bars: speedup vs the seed loop, per case (groups) and contender (bars), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in rows if not r["is_baseline"]))
    palette = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")  # the metric prox terms add labels
    colors = {label: palette(i % palette.N) for i, label in enumerate(labels)}
    case_names = [c.name for c in cases]
    fig, axes = plt.subplots(len(penalties), len(MODES), squeeze=False,
                             figsize=(6.5 * len(MODES), 3.8 * len(penalties)))
    for i, penalty in enumerate(penalties):
        modes = (PROX,) if penalty in METRIC_PROX else MODES
        for j in range(len(MODES)):
            ax = axes[i][j]
            if j >= len(modes):
                ax.axis("off")
                continue
            mode = modes[j]
            speedup = {(r["case"], r["label"]): r["speedup_vs_seed"] for r in rows
                       if r["penalty"] == penalty and r["mode"] == mode and r["speedup_vs_seed"]
                       and not r["is_baseline"]}
            present = [label for label in labels if any(key[1] == label for key in speedup)]
            width = 0.8 / max(len(present), 1)
            for k, label in enumerate(present):
                xs = [x + (k - (len(present) - 1) / 2) * width for x in range(len(case_names))]
                heights = [speedup.get((case, label), 0) for case in case_names]
                bars = ax.bar(xs, heights, width, label=label, color=colors[label])
                ax.bar_label(bars, labels=[f"{h:.2g}" if h else "" for h in heights], fontsize=6, rotation=90,
                             padding=2)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.margins(y=0.15)
            ax.set_xticks(range(len(case_names)))
            ax.set_xticklabels([c.title for c in cases], fontsize=8)
            ax.set_title(f"{penalty} {mode}", fontsize=10)
            ax.set_ylabel("speedup vs hand loop" if penalty in METRIC_PROX else "speedup vs seed loop")
            ax.grid(axis="y", which="both", alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(4, max(len(handles), 1)), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(handles) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
