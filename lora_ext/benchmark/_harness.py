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
build_runner, run_benchmark (here); DEVICE_PEAKS / device_peaks / add_throughput (_peaks.py);
format_table, format_markdown, write_json, write_png, write_markdown, write_outputs,
add_arguments, main (_output.py). The package re-exports all of them.
"""
from __future__ import annotations

import datetime as _dt
import gc
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

from ._peaks import DEVICE_PEAKS, add_throughput, device_peaks, peaks_for  # noqa: F401  (re-exported)

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
# A case is timed if its MIN_REPEATS rounds fit its share of the budget plus this much (or plus
# the share itself, if larger); beyond that it is skipped, so cheap cases always run.
BUDGET_SLACK_S = 2.0

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


# CPU clocks: wall time, or the CPU time of this process (all its threads). On a machine other
# processes oversubscribe, wall time counts their time slices too; process time does not.
CPU_TIMERS = {"wall": time.perf_counter, "process": time.process_time}


def _time_ms(step: Callable[[], Any], device: torch.device, cpu_timer: str = "wall") -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    clock = CPU_TIMERS[cpu_timer]
    t0 = clock()
    step()
    return (clock() - t0) * 1e3


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
             warmup: int, progress: _Progress | None = None, budget_s: float | None = None,
             cpu_timer: str = "wall", step_hint_s: float | None = None) -> dict:
    """Time the named contestants on one case, interleaved round-robin. Returns the case record.

    budget_s: once the case has taken this long (set-up included), stop after the current
    round, keeping at least MIN_REPEATS timed rounds; the record says how many were taken.
    The first step of each contestant (the correctness check) is timed: from it the case's
    cost is estimated, warm-up rounds are dropped when they do not fit, and a case whose
    minimum rounds would overrun its share by more than BUDGET_SLACK_S is not timed at all
    (record["budget_skipped"] says why), so a slow CPU cannot stretch a run far past its budget.
    step_hint_s: a step's expected cost from earlier cases (see run_benchmark); a case that it
    says cannot fit is skipped before its first call.
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

    # Once per case: do the contestants compute the same function? (also a first warm-up call,
    # timed: it estimates the case's cost against its share of the budget)
    first_step_s: dict[str, float] = {}
    min_rounds = min(MIN_REPEATS, repeats)
    deadline = None if budget_s is None else started + budget_s + max(budget_s, BUDGET_SLACK_S)
    for name, runner in list(runners.items()):
        if deadline is not None and (first_step_s or step_hint_s is not None) and _over_budget(
                record, first_step_s, len(runners), min_rounds, deadline, budget_s, step_hint_s):
            break
        try:
            if runner.forward is not None and family.check is not None:
                with torch.no_grad():
                    err = family.check(case, inputs, name, runner.forward())
                if err is not None:
                    tol = family.tolerance(case)
                    record["check"][name] = {"max_rel_err": err, "tolerance": tol, "ok": err <= tol}
            first_step_s[name] = _time_ms(runner.step, device, "wall") / 1000.0
        except Exception as error:
            record["skipped"][name] = f"failed to run: {type(error).__name__}: {error}"
            del runners[name]
            if progress:
                progress.update(per_contestant)
        if runner.info:
            record["info"][name] = runner.info

    record["first_step_s"] = {n: round(s, 4) for n, s in first_step_s.items()}
    order = list(runners)
    if deadline is not None and order and ("budget_skipped" in record or _over_budget(
            record, first_step_s, len(runners), min_rounds, deadline, budget_s)):
        if progress:
            progress.update(per_contestant * len(order))
        order, per_contestant = [], 0
    elif deadline is not None and warmup and order:
        round_s = sum(first_step_s[n] for n in order)
        if round_s * (warmup + min_rounds) > started + budget_s - time.perf_counter():
            record["warmup_cut"] = {"from": warmup, "to": 0}   # the first call warmed up already
            if progress:
                progress.update(warmup * len(order))
            per_contestant, warmup = per_contestant - warmup, 0
    samples: dict[str, list[float]] = {name: [] for name in order}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(per_contestant):
            k = rep % len(order) if order else 0
            for name in order[k:] + order[:k]:      # rotate who goes first
                ms = _time_ms(runners[name].step, device, cpu_timer)
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
        if samples[name]:         # none when the case was skipped for the budget
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


def _over_budget(record: dict, first_step_s: Mapping[str, float], contestants: int, min_rounds: int,
                 deadline: float, share_s: float, step_hint_s: float | None = None) -> bool:
    """Would the rest of the case (the first calls not yet made, then the minimum timed rounds)
    end past its deadline? Unmeasured contestants are assumed to cost the mean of the measured
    ones (or step_hint_s before any), a first call twice a step (the check's forward, then a
    step). Records why if so."""
    mean = statistics.fmean(first_step_s.values()) if first_step_s else step_hint_s
    unmeasured = contestants - len(first_step_s)
    rest = 2 * mean * unmeasured + (sum(first_step_s.values()) + mean * unmeasured) * min_rounds
    if time.perf_counter() + rest <= deadline:
        return False
    record["budget_skipped"] = {"estimated_s": round(rest, 2), "budget_s": round(share_s, 2)}
    return True


def case_ratios(family: Family, measurements: Mapping[str, Mapping]) -> dict:
    out = {}
    for column, num, den in family.ratios:
        if num in measurements and den in measurements and measurements[den]["median_ms"] > 0:
            out[column] = measurements[num]["median_ms"] / measurements[den]["median_ms"]
        else:
            out[column] = None
    return out


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
                  max_seconds: float | None = None, cpu_timer: str = "wall") -> dict:
    """Run every case; returns the full result document (what write_json writes).

    max_seconds: a budget for the whole run, shared out over the cases still to run (a case
    that finishes early leaves its time to the others); None = no budget.
    cpu_timer: "wall" (time.perf_counter) or "process" (time.process_time) for CPU runs."""
    family = get_family(family) if isinstance(family, str) else family
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names = list(contestants or family.default_contestants)
    for name in names:
        family.contestant(name)          # KeyError on unknown names
    if cpu_timer not in CPU_TIMERS:
        raise ValueError(f"cpu_timer must be one of {', '.join(CPU_TIMERS)}, got {cpu_timer!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    doc = {
        "schema": SCHEMA_VERSION,
        "family": family.name,
        "measures": family.measures,
        "environment": environment(device),
        "config": {"repeats": repeats, "warmup": warmup, "contestants": names,
                   "timer": "cuda events" if device.type == "cuda" else f"time.{CPU_TIMERS[cpu_timer].__name__}",
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
        # Seconds per FLOP of one step, per dtype, from the first calls of earlier cases: it
        # predicts a case's first call, which on a slow path can alone be far past the budget.
        seconds_per_flop: dict[str, float] = {}
        for i, case in enumerate(cases):
            bar.case(case.id)
            budget = hint = None
            flops = (family.work(case).get("flops") if family.work is not None else None) or None
            if max_seconds:
                budget = max(0.0, max_seconds - (time.perf_counter() - started)) / (len(cases) - i)
                if flops and case.dtype in seconds_per_flop:
                    hint = seconds_per_flop[case.dtype] * flops
            record = run_case(family, case, device, names, repeats, warmup, bar, budget, cpu_timer, hint)
            if flops and record.get("first_step_s"):
                seconds_per_flop[case.dtype] = statistics.fmean(record["first_step_s"].values()) / flops
            doc["results"].append(record)
    finally:
        bar.close()
    doc["config"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    doc["environment"]["loadavg_end"] = _loadavg()
    # CPU time of other processes while we ran, as a share of all cores: noise on CPU timings
    doc["environment"]["other_processes_cpu_share"] = other_cpu_share(counters, _cpu_counters())
    return doc
