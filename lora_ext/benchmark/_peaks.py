"""Throughput against the device's peak: datasheet figures per GPU, achieved TFLOP/s and GB/s.

A family that states the work of a step (Family.work: FLOPs and the least bytes moved) gets,
per contestant, achieved TFLOP/s and GB/s from the median time, and on a GPU listed here
their share of its peak.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch


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
