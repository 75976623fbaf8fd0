"""Compare run_peft_suite.sh summaries: the tests that pass in the baseline but not in a mode,
grouped by cause (first error line, with numbers and bracketed values folded).

    python scripts/peft_suite/compare.py summary-stock.json summary-ours.json [summary-accelerate.json ...]

The first file's mode is the baseline. Summaries of one mode split over several runs
(LORA_EXT_SUITE_SLICE) are merged.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys


def cause(message: str) -> str:
    """An error's first line with run-specific details folded, so equal causes group."""
    message, at, where = message.partition(" [at ")  # the location of a failed assert stays as is
    text = re.sub(r"\{[^{}]*\}", "{...}", message)
    text = re.sub(r"\[[^\[\]]*\]", "[...]", text)
    text = re.sub(r"0x[0-9a-f]+", "0x...", text)
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", text)
    return text[:200] + (at + where if at else "")


def test_function(nodeid: str) -> str:
    return nodeid.split("::")[-1].split("[")[0]


def test_row(nodeid: str) -> str:
    """The PEFT test case name (TEST_CASES' first column) from a node id such as
    test_x[False-torch.float16-Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs0]."""
    if "[" not in nodeid:
        return "(not parametrized)"
    ids = nodeid.split("[", 1)[1].rstrip("]")
    if "-LoraConfig" not in ids:
        return ids
    head = ids.split("-LoraConfig")[0]
    if head == "" or head == ids:
        return "(config_cls only)"
    head = head.rsplit("-", 1)[0] if "-" in head else head  # drop the model id / tuner method
    return re.sub(r"^((True|False|None|torch\.\w+|dtype\d+|bias_\w+)-)+", "", head)


def compare(base: dict, other: dict, top: int, out) -> None:
    regressions = sorted(n for n, s in base["outcomes"].items()
                         if s == "passed" and n in other["outcomes"] and other["outcomes"][n] != "passed")
    not_run = sum(1 for n, s in base["outcomes"].items() if s == "passed" and n not in other["outcomes"])
    print(f"\n## {other['mode']} against {base['mode']}: {len(regressions)} tests pass in "
          f"{base['mode']} but not in {other['mode']}"
          + (f" ({not_run} passing in {base['mode']} were not run in {other['mode']})" if not_run else ""),
          file=out)
    gained = sum(1 for n, s in other["outcomes"].items()
                 if s == "passed" and n in base["outcomes"] and base["outcomes"][n] != "passed")
    if gained:
        print(f"({gained} tests pass in {other['mode']} but not in {base['mode']})", file=out)
    by_cause = collections.defaultdict(list)
    for nodeid in regressions:
        by_cause[cause(other["errors"].get(nodeid, f"({other['outcomes'][nodeid]}, no error recorded)"))].append(nodeid)
    print(f"\n### by cause ({len(by_cause)} distinct)", file=out)
    for text, nodeids in sorted(by_cause.items(), key=lambda kv: -len(kv[1]))[:top]:
        rows = collections.Counter(test_row(n) for n in nodeids)
        funcs = collections.Counter(test_function(n) for n in nodeids)
        print(f"- {len(nodeids)}: {text}", file=out)
        print(f"    rows: {', '.join(f'{r} ({c})' for r, c in rows.most_common(6))}"
              + (" ..." if len(rows) > 6 else ""), file=out)
        print(f"    tests: {', '.join(f'{f} ({c})' for f, c in funcs.most_common(6))}"
              + (" ..." if len(funcs) > 6 else ""), file=out)
    if len(by_cause) > top:
        rest = sum(len(v) for _, v in sorted(by_cause.items(), key=lambda kv: -len(kv[1]))[top:])
        print(f"- ... {len(by_cause) - top} more causes, {rest} tests", file=out)
    print("\n### by PEFT test row", file=out)
    rows = collections.Counter(test_row(n) for n in regressions).most_common()
    for row, count in rows[:top]:
        print(f"- {count}: {row}", file=out)
    if len(rows) > top:
        print(f"- ... {len(rows) - top} more rows", file=out)


def merge(parts: list[dict]) -> dict:
    """One summary from the summaries of slices of one mode's run."""
    merged = {"mode": parts[0]["mode"], "selected": sum(p["selected"] for p in parts), "outcomes": {}, "errors": {}}
    for part in parts:
        merged["outcomes"].update(part["outcomes"])
        merged["errors"].update(part["errors"])
    merged["ran"] = len(merged["outcomes"])
    counts = collections.Counter(merged["outcomes"].values())
    merged["counts"] = {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
    if "lora_forwards" in parts[0]:
        for key in ("lora_forwards", "fused_forwards", "fallback_forwards"):
            merged[key] = sum(p[key] for p in parts)
        merged["fused_share"] = merged["fused_forwards"] / merged["lora_forwards"] if merged["lora_forwards"] else None
        reasons = collections.Counter()
        for part in parts:
            reasons.update(part["fallback_reasons"])
        merged["fallback_reasons"] = dict(reasons.most_common())
        merged["accelerate_calls_skipped_no_lora_linear"] = sum(
            p.get("accelerate_calls_skipped_no_lora_linear", 0) for p in parts)
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline")
    parser.add_argument("others", nargs="+")
    parser.add_argument("--top", type=int, default=40, help="causes listed per mode (default 40)")
    args = parser.parse_args(argv)
    by_mode: dict[str, list[dict]] = {}
    for path in [args.baseline, *args.others]:
        with open(path) as f:
            summary = json.load(f)
        by_mode.setdefault(summary["mode"], []).append(summary)
    summaries = [merge(parts) for parts in by_mode.values()]
    print("| mode | selected | ran | passed | failed | error | skipped |", file=sys.stdout)
    print("|---|---|---|---|---|---|---|")
    for s in summaries:
        c = s["counts"]
        print(f"| {s['mode']} | {s['selected']} | {s['ran']} | {c['passed']} | {c['failed']} | {c['error']} | "
              f"{c['skipped']} |")
    for s in summaries:
        if s["mode"] == "accelerate" and s.get("lora_forwards"):
            skipped = s.get("accelerate_calls_skipped_no_lora_linear", 0)
            print(f"\naccelerate: {s['fused_forwards']} of {s['lora_forwards']} LoRA layer forwards fused "
                  f"({s['fused_share']:.1%})"
                  + (f"; {skipped} models without a LoRA Linear were not passed to accelerate" if skipped else "")
                  + "; fallbacks by reason:")
            for reason, count in s["fallback_reasons"].items():
                print(f"- {count}: {reason}")
    for other in summaries[1:]:
        compare(summaries[0], other, args.top, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
