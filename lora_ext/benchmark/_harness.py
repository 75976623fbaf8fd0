"""Benchmark harness: `lora-ext bench`, and the pieces benchmarks/ (pytest-benchmark) reuses.

A *family* is a kernel family ("lora" in lora.py; DoRA, NF4 and BGMV register the same
way). It provides its cases (size presets), its inputs and its *contestants*: the ways of
computing the same thing that are timed side by side (the frozen base layer alone, PEFT,
lora-ext, plain PyTorch). A *case* is one point of the grid: family, dtype, in/out
features, tokens, rank, dropout.

Timing: every contestant of a case runs on the very same tensors. After a warm-up the
contestants are interleaved round-robin (rotating the order each repeat), so machine noise
falls on all of them alike; each sample is one call of the contestant's step (for "lora":
forward + backward with x requiring grad, W frozen, lora_A/lora_B trainable), timed with
CUDA events on a GPU and perf_counter on the CPU. Reported: median and IQR of the samples,
and every sample in the JSON. torch's thread count is left as it is, and recorded.

Throughput: a family that gives the work of a step (Family.work: FLOPs and least bytes moved)
gets achieved TFLOP/s and GB/s per contestant in the JSON, and on a GPU listed in
DEVICE_PEAKS their share of that GPU's datasheet peak, shown in the table for ours.

Public pieces: FAMILIES / register_family / get_family, Case, Contestant, Runner,
build_runner, run_benchmark, format_table, format_markdown, write_json, write_png,
write_markdown, write_outputs, DEVICE_PEAKS / device_peaks, add_arguments, main.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

SCHEMA_VERSION = 1

# Names accepted on the command line -> torch dtype name used in Case.dtype.
DTYPE_ALIASES = {
    "fp32": "float32", "float32": "float32", "float": "float32",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp64": "float64", "float64": "float64", "double": "float64",
}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}

# Time budget of a whole run when not given (--max-seconds): (device type, preset) -> s.
# `--quick` on a CPU must stay short even on a slow or busy machine: cases then take fewer
# repeats (never fewer than MIN_REPEATS), and the table says so.
DEFAULT_BUDGET_S = {("cpu", "quick"): 90.0}
MIN_REPEATS = 3

# Defaults for repeats/warm-up when not given: (device type, preset) -> count.
DEFAULT_REPEATS = {("cpu", "quick"): 12, ("cpu", "full"): 8, ("cuda", "quick"): 50, ("cuda", "full"): 50}
# CPU: the output check before timing is a first warm-up call already
DEFAULT_WARMUP = {"cpu": 1, "cuda": 10}


class Unavailable(RuntimeError):
    """A contestant cannot run here (package missing, no kernel for the device, ...)."""


# ---------------------------------------------------------------- cases, contestants, families


@dataclass(frozen=True)
class Case:
    """One benchmark point. `extra` holds family-specific parameters as (key, value) pairs."""
    family: str
    dtype: str            # torch dtype name: "float32", "bfloat16", ...
    in_features: int
    out_features: int
    tokens: int
    r: int
    dropout: float
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def id(self) -> str:
        """Stable, filename- and pytest-friendly id, e.g. lora-bf16-2048x2048-t2048-r16-p0.05."""
        parts = [self.family, DTYPE_SHORT.get(self.dtype, self.dtype),
                 f"{self.in_features}x{self.out_features}", f"t{self.tokens}", f"r{self.r}",
                 f"p{self.dropout:g}"]
        parts += [f"{k}{v}" for k, v in self.extra]
        return "-".join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["extra"] = dict(self.extra)
        d["id"] = self.id
        return d


@dataclass
class Runner:
    """A contestant built for one case on one device.

    step() is what is timed (for "lora": forward + backward); forward() gives the output,
    used once per case to check that the contestants compute the same thing.
    """
    step: Callable[[], Any]
    forward: Callable[[], torch.Tensor] | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Contestant:
    name: str           # key in JSON, --contestants and pytest ids
    label: str          # column header in the table ("ours" for lora_ext)
    description: str
    build: Callable[[Case, Any], Runner]          # (case, inputs) -> Runner; may raise Unavailable
    available: Callable[[torch.device], str | None] = lambda device: None  # reason when not


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    measures: str                                   # what a step is, e.g. "forward+backward"
    presets: Mapping[str, Mapping[str, Any]]        # "quick"/"full" -> make_cases keyword arguments
    make_cases: Callable[..., list[Case]]
    make_inputs: Callable[[Case, torch.device], Any]
    contestants: tuple[Contestant, ...]
    default_contestants: tuple[str, ...]
    baseline: str
    ours: str
    ratios: tuple[tuple[str, str, str], ...]        # (column, numerator, denominator)
    check: Callable[[Case, Any, str, torch.Tensor], float | None] | None = None  # -> rel. error
    tolerance: Callable[[Case], float] = lambda case: 0.0
    # The work of one step, the same for every contestant: {"flops": ..., "bytes": ...} (bytes:
    # the least memory traffic, each operand read or written once per pass). Gives achieved
    # FLOP/s and bandwidth, and their share of the device's peak (DEVICE_PEAKS).
    work: Callable[[Case], Mapping[str, float]] | None = None

    def contestant(self, name: str) -> Contestant:
        for c in self.contestants:
            if c.name == name:
                return c
        raise KeyError(f"family {self.name!r} has no contestant {name!r}; "
                       f"choose from {', '.join(c.name for c in self.contestants)}")

    def cases(self, preset: str = "quick", **overrides) -> list[Case]:
        """The cases of a preset; keyword overrides (None = keep) replace preset fields."""
        if preset not in self.presets:
            raise ValueError(f"family {self.name!r} has no preset {preset!r}; "
                             f"choose from {', '.join(self.presets)}")
        kwargs = dict(self.presets[preset])
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return self.make_cases(**kwargs)


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown benchmark family {name!r}; choose from {', '.join(FAMILIES)}") from None


def build_runner(family: Family, name: str, case: Case, inputs: Any, device: torch.device) -> Runner:
    """Build one contestant; raises Unavailable with the reason when it cannot run here."""
    contestant = family.contestant(name)
    reason = contestant.available(device)
    if reason:
        raise Unavailable(reason)
    return contestant.build(case, inputs)


def synchronized(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """fn followed by a device synchronize (for timers that read the host clock)."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return call


# ---------------------------------------------------------------- timing


def _time_ms(step: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def summarize(samples: Sequence[float]) -> dict:
    """median, IQR (inclusive quartiles), min, mean and every sample, in ms."""
    s = sorted(samples)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"median_ms": statistics.median(s), "iqr_ms": q3 - q1, "q1_ms": q1, "q3_ms": q3,
            "min_ms": s[0], "max_ms": s[-1], "mean_ms": statistics.fmean(s), "n": len(s),
            "samples_ms": list(samples)}


class _Progress:
    """tqdm when installed (on stderr), else one plain line per case; or nothing."""

    def __init__(self, total: int, enabled: bool, ncases: int):
        self.enabled, self.total, self.ncases, self.done, self.case_no = enabled, total, ncases, 0, 0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, unit="call", file=sys.stderr, dynamic_ncols=True,
                                leave=False)
            except ImportError:
                pass

    def case(self, case_id: str):
        self.case_no += 1
        if self.bar is not None:
            self.bar.set_description(f"[{self.case_no}/{self.ncases}] {case_id}")
        elif self.enabled:
            pct = 100.0 * self.done / max(self.total, 1)
            print(f"[{self.case_no}/{self.ncases}] {pct:5.1f}% {case_id}", file=sys.stderr, flush=True)

    def update(self, n: int = 1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_case(family: Family, case: Case, device: torch.device, names: Sequence[str], repeats: int,
             warmup: int, progress: _Progress | None = None, budget_s: float | None = None) -> dict:
    """Time the named contestants on one case, interleaved round-robin. Returns the case record.

    budget_s: once the case has taken this long (set-up included), stop after the current
    round, keeping at least MIN_REPEATS timed rounds; the record says how many were taken.
    """
    started = time.perf_counter()
    record: dict = {"case": case.as_dict(), "measurements": {}, "skipped": {}, "check": {}, "info": {}}
    inputs = family.make_inputs(case, device)
    runners: dict[str, Runner] = {}
    per_contestant = warmup + repeats
    for name in names:
        try:
            runners[name] = build_runner(family, name, case, inputs, device)
        except Unavailable as why:
            record["skipped"][name] = str(why)
        except Exception as error:  # a broken contestant must not sink the others
            record["skipped"][name] = f"failed to build: {type(error).__name__}: {error}"
        if name in record["skipped"] and progress:
            progress.update(per_contestant)

    # Once per case: do the contestants compute the same function? (also a first warm-up call)
    for name, runner in list(runners.items()):
        try:
            if runner.forward is not None and family.check is not None:
                with torch.no_grad():
                    err = family.check(case, inputs, name, runner.forward())
                if err is not None:
                    tol = family.tolerance(case)
                    record["check"][name] = {"max_rel_err": err, "tolerance": tol, "ok": err <= tol}
            runner.step()
        except Exception as error:
            record["skipped"][name] = f"failed to run: {type(error).__name__}: {error}"
            del runners[name]
            if progress:
                progress.update(per_contestant)
        if runner.info:
            record["info"][name] = runner.info

    order = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in order}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(per_contestant):
            k = rep % len(order) if order else 0
            for name in order[k:] + order[:k]:      # rotate who goes first
                ms = _time_ms(runners[name].step, device)
                if rep >= warmup:
                    samples[name].append(ms)
                if progress:
                    progress.update(1)
            timed = rep + 1 - warmup
            if budget_s is not None and timed >= min(MIN_REPEATS, repeats) and rep + 1 < per_contestant \
                    and time.perf_counter() - started > budget_s:
                record["stopped_early"] = {"repeats": timed, "budget_s": round(budget_s, 2)}
                if progress:
                    progress.update((per_contestant - rep - 1) * len(order))
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    for name in order:
        record["measurements"][name] = summarize(samples[name])
    record["ratios"] = case_ratios(family, record["measurements"])
    if family.work is not None:
        record["work"] = dict(family.work(case))
        add_throughput(record, peaks_for(device, case.dtype))
    del runners, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def case_ratios(family: Family, measurements: Mapping[str, Mapping]) -> dict:
    out = {}
    for column, num, den in family.ratios:
        if num in measurements and den in measurements and measurements[den]["median_ms"] > 0:
            out[column] = measurements[num]["median_ms"] / measurements[den]["median_ms"]
        else:
            out[column] = None
    return out


# ---------------------------------------------------------------- throughput vs device peak

# Vendor datasheet peaks (dense, no sparsity, boost clocks): memory bandwidth in GB/s and
# TFLOP/s per dtype ("tf32" = float32 matmuls with TF32 allowed; float32 = CUDA cores).
# First pattern that matches torch.cuda.get_device_name() (lower-cased) wins: specific first.
DEVICE_PEAKS: tuple[tuple[str, str, dict], ...] = (
    (r"gh200", "GH200 (H200 SXM figures)", {"gbps": 4800, "float64": 67, "float32": 67, "tf32": 494.5,
                                            "bfloat16": 989.5, "float16": 989.5}),
    (r"h200.*nvl", "H200 NVL", {"gbps": 4800, "float64": 60, "float32": 60, "tf32": 417.5,
                                "bfloat16": 835, "float16": 835}),
    (r"h200", "H200 SXM", {"gbps": 4800, "float64": 67, "float32": 67, "tf32": 494.5,
                           "bfloat16": 989.5, "float16": 989.5}),
    (r"h100.*nvl", "H100 NVL", {"gbps": 3900, "float64": 60, "float32": 60, "tf32": 417.5,
                                "bfloat16": 835, "float16": 835}),
    (r"h100.*pcie", "H100 PCIe", {"gbps": 2000, "float64": 51, "float32": 51, "tf32": 378,
                                  "bfloat16": 756, "float16": 756}),
    (r"h100", "H100 SXM", {"gbps": 3350, "float64": 67, "float32": 67, "tf32": 494.5,
                           "bfloat16": 989.5, "float16": 989.5}),
    (r"a100.*80gb.*pcie|a100.*pcie.*80gb", "A100 80GB PCIe", {"gbps": 1935, "float64": 19.5,
     "float32": 19.5, "tf32": 156, "bfloat16": 312, "float16": 312}),
    (r"a100.*80gb", "A100 80GB SXM", {"gbps": 2039, "float64": 19.5, "float32": 19.5, "tf32": 156,
                                      "bfloat16": 312, "float16": 312}),
    (r"a100", "A100 40GB", {"gbps": 1555, "float64": 19.5, "float32": 19.5, "tf32": 156,
                            "bfloat16": 312, "float16": 312}),
    (r"b200", "B200", {"gbps": 8000, "float64": 40, "float32": 80, "tf32": 1100, "bfloat16": 2250,
                       "float16": 2250}),
    (r"l40s", "L40S", {"gbps": 864, "float64": 1.4, "float32": 91.6, "tf32": 183, "bfloat16": 362,
                       "float16": 362}),
    (r"l40\b", "L40", {"gbps": 864, "float64": 1.4, "float32": 90.5, "tf32": 90.5, "bfloat16": 181,
                       "float16": 181}),
    (r"\bl4\b", "L4", {"gbps": 300, "float64": 0.49, "float32": 30.3, "tf32": 60, "bfloat16": 121,
                      "float16": 121}),
    (r"\ba10\b", "A10", {"gbps": 600, "float64": 0.98, "float32": 31.2, "tf32": 62.5, "bfloat16": 125,
                        "float16": 125}),
    (r"rtx 4090", "GeForce RTX 4090", {"gbps": 1008, "float64": 1.3, "float32": 82.6, "tf32": 82.6,
                                       "bfloat16": 165.2, "float16": 165.2}),
    (r"\bt4\b", "T4", {"gbps": 320, "float64": 0.25, "float32": 8.1, "float16": 65}),
)


def device_peaks(name: str) -> dict | None:
    """Peak figures for a GPU name, e.g. "NVIDIA H200" -> {"model": "H200 SXM", "gbps": 4800, ...}."""
    lowered = name.lower()
    for pattern, model, peaks in DEVICE_PEAKS:
        if re.search(pattern, lowered):
            return {"model": model, **peaks}
    return None


def peaks_for(device: torch.device, dtype: str) -> dict | None:
    """{"model", "gbps", "tflops"} for a case's dtype on this device; None off the GPU table."""
    if device.type != "cuda":
        return None
    peaks = device_peaks(torch.cuda.get_device_name(device))
    if peaks is None:
        return None
    key = "tf32" if dtype == "float32" and torch.backends.cuda.matmul.allow_tf32 else dtype
    return {"model": peaks["model"], "gbps": peaks["gbps"], "tflops": peaks.get(key), "tflops_dtype": key}


def add_throughput(record: dict, peaks: Mapping | None) -> None:
    """Achieved TFLOP/s and GB/s of each measured contestant (from medians), and % of peak."""
    work = record["work"]
    for m in record["measurements"].values():
        seconds = m["median_ms"] / 1e3
        if seconds <= 0:
            continue
        if work.get("flops"):
            m["tflops"] = work["flops"] / seconds / 1e12
        if work.get("bytes"):
            m["gbps"] = work["bytes"] / seconds / 1e9
        if peaks:
            if peaks.get("tflops") and "tflops" in m:
                m["pct_peak_flops"] = 100.0 * m["tflops"] / peaks["tflops"]
            if peaks.get("gbps") and "gbps" in m:
                m["pct_peak_bandwidth"] = 100.0 * m["gbps"] / peaks["gbps"]
    if peaks:
        record["peak"] = dict(peaks)


# ---------------------------------------------------------------- environment facts


def find_repo_root(start: Path | None = None) -> Path | None:
    """The lora-ext source checkout containing `start` (default: cwd), or None."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file() and (d / "lora_ext" / "__init__.py").is_file() \
                and (d / "benchmarks").is_dir():
            return d
    return None


def git_commit(package_dir: Path | None = None) -> dict:
    """Commit of the lora_ext source being benchmarked, when it is a git checkout."""
    package_dir = package_dir or Path(__file__).resolve().parents[1]    # lora_ext/
    info = {"commit": None, "dirty": None}
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package_dir,
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != package_dir.parent:
            return info
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True,
                              text=True, timeout=10)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=package_dir, capture_output=True, text=True, timeout=10)
            info["dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_counters() -> tuple[float, float, float] | None:
    """(machine busy seconds, machine total seconds, this process's CPU seconds), Linux only."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = [int(v) for v in fields[:8]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    idle = ticks[3] + ticks[4]                # idle + iowait
    t = os.times()
    return (sum(ticks) - idle) / hz, sum(ticks) / hz, t.user + t.system


def other_cpu_share(start, end) -> float | None:
    """Share of all cores' time that other processes used between two _cpu_counters()."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    others = (end[0] - start[0]) - (end[2] - start[2])
    return round(max(0.0, others) / (end[1] - start[1]), 3)


def environment(device: torch.device) -> dict:
    import lora_ext
    env = {
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "lora_ext_version": lora_ext.__version__,
        "lora_ext_build": dict(lora_ext.BUILD_INFO),
        "lora_ext_cuda_kernels": torch._C._dispatch_has_kernel_for_dispatch_key(
            "lora_ext::lora_linear_forward", "CUDA"),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
    }
    try:
        from importlib.metadata import PackageNotFoundError, version
        env["peft_version"] = version("peft")
    except (ImportError, PackageNotFoundError):
        env["peft_version"] = None
    git = git_commit()
    env["git_commit"], env["git_dirty"] = git["commit"], git["dirty"]
    if device.type == "cuda":
        env["cuda_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


# ---------------------------------------------------------------- the run


def run_benchmark(family: Family | str, cases: Sequence[Case], device: str | torch.device = "cpu",
                  repeats: int = 15, warmup: int = 3, contestants: Sequence[str] | None = None,
                  progress: bool = True, config: Mapping | None = None,
                  max_seconds: float | None = None) -> dict:
    """Run every case; returns the full result document (what write_json writes).

    max_seconds: a budget for the whole run, shared out over the cases still to run (a case
    that finishes early leaves its time to the others); None = no budget."""
    family = get_family(family) if isinstance(family, str) else family
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(contestants or family.default_contestants)
    for name in names:
        family.contestant(name)          # KeyError on unknown names
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    doc = {
        "schema": SCHEMA_VERSION,
        "family": family.name,
        "measures": family.measures,
        "environment": environment(device),
        "config": {"repeats": repeats, "warmup": warmup, "contestants": names,
                   "timer": "cuda events" if device.type == "cuda" else "time.perf_counter",
                   "order": "round-robin over repeats, rotating first contestant",
                   "max_seconds": max_seconds,
                   **(config or {})},
        "contestants": {c.name: {"label": c.label, "description": c.description}
                        for c in family.contestants if c.name in names},
        "ratios": [{"column": col, "numerator": n, "denominator": d} for col, n, d in family.ratios],
        "results": [],
    }
    bar = _Progress(len(cases) * len(names) * (warmup + repeats), progress, len(cases))
    counters = _cpu_counters()
    started = time.perf_counter()
    try:
        for i, case in enumerate(cases):
            bar.case(case.id)
            budget = None
            if max_seconds:
                budget = max(0.0, max_seconds - (time.perf_counter() - started)) / (len(cases) - i)
            doc["results"].append(run_case(family, case, device, names, repeats, warmup, bar, budget))
    finally:
        bar.close()
    doc["environment"]["loadavg_end"] = _loadavg()
    # CPU time of other processes while we ran, as a share of all cores: noise on CPU timings
    doc["environment"]["other_processes_cpu_share"] = other_cpu_share(counters, _cpu_counters())
    return doc


# ---------------------------------------------------------------- output


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
        f"times: median ±IQR in ms over {_repeats_text(doc)} repeats (after {cfg['warmup']} warm-up), "
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
                        help="PNG chart path (same default place; skipped without matplotlib)")
    parser.add_argument("--max-seconds", type=float, default=None, metavar="S",
                        help="time budget of a run: cases take fewer repeats (at least "
                             f"{MIN_REPEATS}) to keep within it (default: 90 for --quick on cpu, "
                             "else none; 0 = none)")
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
    without matplotlib). Default place: `output`, else benchmarks/results/ of a checkout, else cwd."""
    stem = default_output_stem(doc["family"], device)
    out_dir = Path(output) if output else default_output_dir()
    paths = {"json": write_json(doc, json_path or out_dir / f"{stem}.json")}
    paths["png"] = write_png(doc, png_path or out_dir / f"{stem}.png")
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
                            max_seconds=max_seconds or None)
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
