"""`lora-ext bench` output and command line: the text and markdown tables, JSON, the PNG
chart, default file names, the options and main().
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ._harness import (DEFAULT_BUDGET_S, DEFAULT_REPEATS, DEFAULT_WARMUP, DTYPE_ALIASES, DTYPE_SHORT,
                       FAMILIES, MIN_REPEATS, Case, Family, device_name, find_repo_root, get_family,
                       run_benchmark)

def _fmt_ms(m: Mapping | None) -> str:
    if not m:
        return "n/a"
    med, iqr = m["median_ms"], m["iqr_ms"]
    digits = 2 if med < 100 else 1
    return f"{med:.{digits}f} ±{iqr:.{digits}f}"


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _fmt_pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}%"


def _show_throughput(doc: Mapping) -> bool:
    """Throughput columns in the table: on a GPU, when the family gives the work of a step."""
    return doc["environment"].get("device_type") == "cuda" and any("work" in r for r in doc["results"])


def table_rows(doc: Mapping) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by the text and markdown tables)."""
    labels = {name: c["label"] for name, c in doc["contestants"].items()}
    names = [n for n in doc["config"]["contestants"] if n in labels]
    ratio_cols = [r["column"] for r in doc["ratios"]]
    extras = any(res["case"].get("extra") for res in doc["results"])
    ours = next((n for n in names if labels[n] == "ours"), None)
    throughput = _show_throughput(doc) and ours is not None
    header = ["dtype", "in x out"] + (["params"] if extras else []) + ["tokens", "r", "dropout"] \
        + [f"{labels[n]} ms" for n in names] + ratio_cols
    if throughput:
        header += ["ours TFLOP/s", "% peak FLOP/s", "ours GB/s", "% peak GB/s"]
    rows = []
    for res in doc["results"]:
        c = res["case"]
        row = [DTYPE_SHORT.get(c["dtype"], c["dtype"]), f"{c['in_features']}x{c['out_features']}"]
        if extras:
            row.append(" ".join(f"{k}={v}" for k, v in (c.get("extra") or {}).items()) or "-")
        row += [str(c["tokens"]), str(c["r"]), f"{c['dropout']:g}"]
        row += [_fmt_ms(res["measurements"].get(n)) for n in names]
        row += [_fmt_ratio(res["ratios"].get(col)) for col in ratio_cols]
        if throughput:
            m = res["measurements"].get(ours) or {}
            row += ["n/a" if "tflops" not in m else f"{m['tflops']:.1f}", _fmt_pct(m.get("pct_peak_flops")),
                    "n/a" if "gbps" not in m else f"{m['gbps']:.0f}", _fmt_pct(m.get("pct_peak_bandwidth"))]
        rows.append(row)
    return header, rows


def _repeats_text(doc: Mapping) -> str:
    fewest = min((res["stopped_early"]["repeats"] for res in doc["results"] if res.get("stopped_early")),
                 default=None)
    return f"{doc['config']['repeats']}" if fewest is None else f"{fewest} to {doc['config']['repeats']}"


def _headline(doc: Mapping) -> list[str]:
    env, cfg = doc["environment"], doc["config"]
    threads = env.get("torch_num_threads")
    lines = [
        f"lora-ext bench  family={doc['family']}  {doc['measures']}",
        f"device {env['device']} ({env['device_name']}), torch {env['torch_version']}, "
        f"lora_ext {env['lora_ext_version']}, {threads} torch threads / {env['cpu_count']} CPUs, "
        f"commit {(env.get('git_commit') or 'n/a')[:12]}{'+dirty' if env.get('git_dirty') else ''}, "
        f"{env.get('date_utc', '')}",
        f"times ({cfg.get('timer', 'time.perf_counter')}): median ±IQR in ms over {_repeats_text(doc)} repeats "
        f"(after {cfg['warmup']} warm-up), "
        "contestants interleaved; ratios are of medians (x/base < 1 is faster than base; "
        "speedup > 1 means ours is faster)",
    ]
    if _show_throughput(doc):
        peak = next((r["peak"] for r in doc["results"] if r.get("peak")), None)
        lines.append("throughput of ours: FLOPs and least bytes moved per step / median time; "
                     + (f"% of the {peak['model']} datasheet peak (dense)" if peak
                        else "no peak figures for this GPU (DEVICE_PEAKS)"))
    return lines


def _notes(doc: Mapping) -> list[str]:
    env = doc["environment"]
    notes = []
    for res in doc["results"]:
        for name, why in res.get("skipped", {}).items():
            notes.append(f"{res['case']['id']}: {name} skipped: {why}")
        for name, chk in res.get("check", {}).items():
            if not chk["ok"]:
                notes.append(f"{res['case']['id']}: {name} output differs from the reference: "
                             f"max rel. error {chk['max_rel_err']:.3g} > {chk['tolerance']:.3g}")
    short = [res for res in doc["results"] if res.get("stopped_early")]
    if short:
        fewest = min(res["stopped_early"]["repeats"] for res in short)
        notes.append(f"{len(short)} of {len(doc['results'])} cases took fewer repeats (down to "
                     f"{fewest}) to keep within the {doc['config'].get('max_seconds'):g} s budget "
                     "(--max-seconds; 0 = none)")
    skipped = [res for res in doc["results"] if res.get("budget_skipped")]
    for res in skipped:
        est = res["budget_skipped"]
        notes.append(f"{res['case']['id']}: not timed: its first calls and {MIN_REPEATS} rounds would take about "
                     f"{est['estimated_s']:g} s more, far past its {est['budget_s']:g} s share of the budget "
                     "(first calls measured; --max-seconds 0 times every case)")
    cut = sum(1 for res in doc["results"] if res.get("warmup_cut"))
    if cut:
        notes.append(f"{cut} cases took no warm-up rounds beyond their first call, to fit the budget")
    budget, elapsed = doc["config"].get("max_seconds"), doc["config"].get("elapsed_s")
    if budget and elapsed is not None and elapsed > budget:
        notes.append(f"the run took {elapsed:g} s against its {budget:g} s budget (first calls and "
                     "the minimum rounds are never cut)")
    share = env.get("other_processes_cpu_share")
    if env.get("device_type") == "cpu" and share is not None and share > 0.05:
        notes.append(f"other processes used {100 * share:.0f}% of all CPU time during the run: "
                     "they compete for the cores, so CPU timings are noisy")
    seen = set()
    return [n for n in notes if not (n in seen or seen.add(n))]


def format_table(doc: Mapping) -> str:
    """The summary table of a result document, as text."""
    header, rows = table_rows(doc)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = 2   # dtype and shape left-aligned, numbers right-aligned

    def line(cells):
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths)))
    labels = {name: c["label"] for name, c in doc["contestants"].items()}
    names = [n for n in doc["config"]["contestants"] if n in labels]
    out = [*_headline(doc), "", line(header), line(["-" * w for w in widths]), *(line(r) for r in rows), ""]
    out += [f"  {labels[n]:>6} = {doc['contestants'][n]['description']}" for n in names]
    notes = _notes(doc)
    if notes:
        out += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(out)


def format_markdown(doc: Mapping) -> str:
    """The summary table as GitHub markdown (README-ready), with its headline and notes."""
    header, rows = table_rows(doc)

    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    align = ["---" if i < 2 else "---:" for i in range(len(header))]
    labels = {name: c["label"] for name, c in doc["contestants"].items()}
    names = [n for n in doc["config"]["contestants"] if n in labels]
    out = [f"### {doc['family']}: {doc['measures']}", ""]
    out += [f"{h}  " for h in _headline(doc)[1:]] + [""]
    out += [line(header), line(align), *(line(r) for r in rows), ""]
    out += [f"- **{labels[n]}**: {doc['contestants'][n]['description']}" for n in names]
    notes = _notes(doc)
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def write_markdown(doc: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(doc))
    return path


def write_json(doc: Mapping, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _case_label(case: Mapping, varying: set[str]) -> str:
    parts = [DTYPE_SHORT.get(case["dtype"], case["dtype"]), f"{case['in_features']}x{case['out_features']}"]
    if "tokens" in varying:
        parts.append(f"t{case['tokens']}")
    if "r" in varying:
        parts.append(f"r{case['r']}")
    parts.append(f"p{case['dropout']:g}")
    return " ".join(parts)


def write_png(doc: Mapping, path: str | Path) -> Path | None:
    """Grouped bars of time / base time per case; returns None (writes nothing) without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    base = get_family(doc["family"]).baseline if doc["family"] in FAMILIES else "base"
    results = doc["results"]
    names = [n for n in doc["config"]["contestants"] if n != base]
    labels = {n: c["label"] for n, c in doc["contestants"].items()}
    varying = {k for k in ("tokens", "r") if len({res["case"][k] for res in results}) > 1}
    xlabels = [_case_label(res["case"], varying) for res in results]
    fig = Figure(figsize=(max(6.0, 1.1 * len(results) + 2.0), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        vals = []
        for res in results:
            m, b = res["measurements"].get(name), res["measurements"].get(base)
            vals.append(m["median_ms"] / b["median_ms"] if m and b and b["median_ms"] > 0 else math.nan)
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(results))]
        bars = ax.bar(xs, vals, width, label=labels.get(name, name))
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" for v in vals], fontsize=7,
                     padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(results)), xlabels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"time / {labels.get(base, base)} time (lower is better)")
    env = doc["environment"]
    ax.set_title(f"{doc['family']}: {doc['measures'].split(' (')[0]} on {env['device_name']} "
                 f"({env['device']}), torch {env['torch_version']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_output_stem(family: str, device: torch.device, when: _dt.datetime | None = None) -> str:
    when = when or _dt.datetime.now(_dt.timezone.utc)
    dev = "cpu" if device.type == "cpu" else f"{device.type}-{_slug(device_name(device))}"
    return f"{family}-{dev}-{when.strftime('%Y%m%dT%H%M%SZ')}"


def default_output_dir() -> Path:
    """benchmarks/results/ of the lora-ext checkout we run from, else the current directory."""
    root = find_repo_root()
    return root / "benchmarks" / "results" if root else Path.cwd()


# ---------------------------------------------------------------- command line


def _csv(kind: Callable[[str], Any]):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _dtype_name(text: str) -> str:
    key = text.strip().lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {text!r}; choose from fp32, bf16, fp16, fp64")
    return DTYPE_ALIASES[key]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lora-ext bench`."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="device to time on (default: cuda if available, else cpu)")
    parser.add_argument("--family", type=_csv(str), default=None, metavar="NAME[,NAME]|all",
                        help=f"kernel families to benchmark, one after the other: "
                             f"{', '.join(sorted(FAMILIES))} or all (default: lora)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="small grid (in/out 1024, 2048), the default")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="full grid (in/out 1024, 2048, 4096)")
    parser.set_defaults(preset="quick")
    parser.add_argument("--dtype", action="append", type=_csv(_dtype_name), default=None,
                        metavar="DTYPE[,DTYPE]",
                        help="only these dtypes (fp32, bf16, fp16, fp64; repeatable; default: the "
                             "preset's fp32 and bf16)")
    parser.add_argument("--features", type=_csv(str), default=None, metavar="N|INxOUT[,...]",
                        help="override the preset's in/out features, e.g. 4096 or 4096x11008")
    parser.add_argument("--tokens", type=_csv(int), default=None, metavar="T[,T]",
                        help="override the preset's tokens per call (default 2048)")
    parser.add_argument("--rank", type=_csv(int), default=None, metavar="R[,R]",
                        help="override the preset's LoRA rank (default 16)")
    parser.add_argument("--dropout", type=_csv(float), default=None, metavar="P[,P]",
                        help="override the preset's dropout values (default 0,0.05)")
    parser.add_argument("--contestants", type=_csv(str), default=None, metavar="NAME[,NAME]",
                        help="contestants to time (lora: base, peft, lora_ext, torch; default all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per contestant and case (default: cpu 12 quick / 8 full, "
                             "cuda 50)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per contestant first (default: cpu 1, cuda 10; the output "
                             "check before them is one more)")
    parser.add_argument("--output", "-o", default=None, metavar="DIR",
                        help="write each family's results to DIR: <family>-<device>-<date>.json, "
                             ".png (chart) and .md (markdown table)")
    parser.add_argument("--out-json", default=None, metavar="PATH",
                        help="JSON results path (default: benchmarks/results/ in a checkout, else "
                             "the current directory; the name holds family, device and date)")
    parser.add_argument("--out-png", default=None, metavar="PATH",
                        help="PNG chart path (default: beside --out-json, else the same default place; "
                             "skipped without matplotlib)")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="time budget of a run: cases take fewer repeats (at least "
                             f"{MIN_REPEATS}) to keep within it (default: 90 for --quick on cpu, "
                             "else none; 0 = none)")
    parser.add_argument("--cpu-timer", choices=["wall", "process"], default="wall",
                        help="CPU clock: wall time (default) or this process's CPU time, which "
                             "other processes on an oversubscribed machine do not inflate (with "
                             "one torch thread it is the work of the timed call)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def family_names(requested: Sequence[str] | None) -> list[str]:
    """--family values -> registered family names ("all" = every family, registry order)."""
    names: list[str] = []
    for name in requested or ["lora"]:
        for n in (list(FAMILIES) if name == "all" else [name]):
            get_family(n)                      # ValueError naming the choices
            if n not in names:
                names.append(n)
    return names


def write_outputs(doc: Mapping, device: torch.device, *, output: str | Path | None = None,
                  json_path: str | Path | None = None, png_path: str | Path | None = None) -> dict:
    """JSON, PNG and markdown of one family's run; returns {"json", "png", "md"} paths (png None
    without matplotlib). Default place: `output`, else benchmarks/results/ of a checkout, else cwd;
    the chart and the table go beside a JSON path that is given."""
    stem = default_output_stem(doc["family"], device)
    out_dir = Path(output) if output else default_output_dir()
    paths = {"json": write_json(doc, json_path or out_dir / f"{stem}.json")}
    paths["png"] = write_png(doc, png_path or (Path(json_path).with_suffix(".png") if json_path
                                               else out_dir / f"{stem}.png"))
    paths["md"] = write_markdown(doc, Path(paths["json"]).with_suffix(".md"))
    return paths


def main(args: argparse.Namespace, *, cases: Sequence[Case] | None = None) -> int:
    """`lora-ext bench`. `cases` replaces the preset grid (used by tests for tiny sizes)."""
    requested = getattr(args, "family", None)
    if isinstance(requested, str):
        requested = [requested]
    try:
        families = [get_family(n) for n in family_names(requested)]
    except ValueError as error:
        print(f"lora-ext bench: {error} (or all)", file=sys.stderr)
        return 2
    if cases is not None:
        families = [get_family(cases[0].family)] if cases else families[:1]
    if len(families) > 1 and (getattr(args, "out_json", None) or getattr(args, "out_png", None)):
        print("lora-ext bench: --out-json/--out-png name one file; with several families use "
              "--output DIR", file=sys.stderr)
        return 2
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_name == "cuda" and not torch.cuda.is_available():
        print("lora-ext bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    device = torch.device(dev_name)
    preset = getattr(args, "preset", None) or "quick"
    status = 0
    for family in families:
        code = _run_family(family, args, device, preset, cases)
        status = status or code
    return status


def _run_family(family: Family, args: argparse.Namespace, device: torch.device, preset: str,
                cases: Sequence[Case] | None) -> int:
    if cases is None:
        dtypes = [d for group in args.dtype for d in group] if args.dtype else None
        try:
            cases = family.cases(preset, features=args.features, tokens=args.tokens, ranks=args.rank,
                                 dropouts=args.dropout, dtypes=dtypes)
        except (TypeError, ValueError) as error:
            print(f"lora-ext bench: family {family.name}: {error}", file=sys.stderr)
            return 2
    elif args.dtype:
        wanted = {d for group in args.dtype for d in group}
        cases = [c for c in cases if c.dtype in wanted]
    if not cases:
        print(f"lora-ext bench: family {family.name}: no cases to run", file=sys.stderr)
        return 2
    repeats = args.repeats or DEFAULT_REPEATS.get((device.type, preset), 15)
    warmup = args.warmup if args.warmup is not None else DEFAULT_WARMUP.get(device.type, 3)
    max_seconds = getattr(args, "max_seconds", None)
    if max_seconds is None:
        max_seconds = DEFAULT_BUDGET_S.get((device.type, preset))
    try:
        doc = run_benchmark(family, cases, device, repeats=repeats, warmup=warmup,
                            contestants=args.contestants, progress=not args.no_progress,
                            config={"preset": preset, "argv": sys.argv},
                            max_seconds=max_seconds or None,
                            cpu_timer=getattr(args, "cpu_timer", "wall"))
    except (KeyError, ValueError) as error:
        print(f"lora-ext bench: {error}", file=sys.stderr)
        return 2
    print(format_table(doc))
    paths = write_outputs(doc, device, output=getattr(args, "output", None),
                          json_path=args.out_json, png_path=args.out_png)
    print(f"\nJSON: {paths['json']}")
    print(f"PNG:  {paths['png']}" if paths["png"] else "PNG:  skipped (matplotlib is not installed)")
    print(f"MD:   {paths['md']}\n")
    return 0
