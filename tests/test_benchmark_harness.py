"""The benchmark harness (`lora-ext bench`) end to end on the CPU, at tiny sizes."""
import argparse
import importlib.util
import json

import pytest
import torch

from lora_ext import benchmark as harness
from lora_ext import cli

HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _parse(argv):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_wires_bench_options():
    # `lora-ext bench --help` lists the harness options, and the families come from the registry
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0
    args = _parse(["--full", "--device", "cpu", "--dtype", "bf16", "--repeats", "3"])
    assert (args.preset, args.device, args.dtype, args.repeats) == ("full", "cpu", [["bfloat16"]], 3)
    assert "lora" in harness.FAMILIES


def test_presets_match_the_spec():
    lora = harness.get_family("lora")
    quick, full = lora.cases("quick"), lora.cases("full")
    assert {(c.in_features, c.out_features) for c in quick} == {(1024, 1024), (2048, 2048)}
    assert {c.in_features for c in full} == {1024, 2048, 4096}
    for cases in (quick, full):
        assert {c.dtype for c in cases} == {"float32", "bfloat16"}
        assert {c.dropout for c in cases} == {0.0, 0.05}
        assert {(c.tokens, c.r) for c in cases} == {(2048, 16)}
    assert len({c.id for c in full}) == len(full)


def test_bench_end_to_end_on_cpu(tmp_path, capsys):
    lora = harness.get_family("lora")
    cases = lora.cases("quick", features=(64,), tokens=32, dtypes=("float32", "bfloat16"))
    json_path, png_path = tmp_path / "out" / "bench.json", tmp_path / "out" / "bench.png"
    args = _parse(["--device", "cpu", "--repeats", "2", "--warmup", "1", "--no-progress",
                   "--out-json", str(json_path), "--out-png", str(png_path)])
    assert harness.main(args, cases=cases) == 0
    out = capsys.readouterr().out

    # the table: a header with every contestant and ratio column, one row per case
    for column in ("base ms", "peft ms", "ours ms", "torch ms", "ours/base", "peft/base",
                   "peft/ours"):
        assert column in out
    assert len([line for line in out.splitlines() if line.startswith(("fp32 ", "bf16 "))]) == 4

    doc = json.loads(json_path.read_text())
    env = doc["environment"]
    for key in ("device", "device_name", "torch_version", "lora_ext_version", "lora_ext_build",
                "cpu_count", "torch_num_threads", "git_commit", "date_utc",
                "other_processes_cpu_share"):
        assert key in env, key
    assert env["device"] == "cpu" and env["cpu_count"] >= 1 and env["torch_num_threads"] >= 1
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert doc["config"]["repeats"] == 2 and doc["family"] == "lora"
    assert len(doc["results"]) == len(cases) == 4

    expected = {"base", "lora_ext", "torch"} | ({"peft"} if HAS_PEFT else set())
    for res in doc["results"]:
        assert set(res["measurements"]) == expected, res["skipped"]
        for name, m in res["measurements"].items():
            assert len(m["samples_ms"]) == 2 and m["n"] == 2
            assert all(s > 0 for s in m["samples_ms"])
            assert 0 < m["min_ms"] <= m["median_ms"] <= m["max_ms"] < 60_000
            assert m["iqr_ms"] >= 0
        assert res["ratios"]["ours/base"] > 0
        if HAS_PEFT:
            assert res["ratios"]["peft/ours (speedup)"] > 0
        else:
            assert "peft" in res["skipped"]
        # at dropout 0 every contestant computes the same y as the fp32 reference
        if res["case"]["dropout"] == 0:
            assert set(res["check"]) == expected
            assert all(chk["ok"] for chk in res["check"].values()), res["check"]

    if HAS_MATPLOTLIB:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png_path.exists()


def test_png_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    doc = harness.run_benchmark("lora", harness.get_family("lora").cases(
        "quick", features=(32,), tokens=8, dtypes=("float32",), dropouts=(0.0,)),
        device="cpu", repeats=1, warmup=0, contestants=["base", "lora_ext"], progress=False)
    assert "ours ms" in harness.format_table(doc)
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert harness.write_png(doc, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_unknown_contestant_is_an_error():
    with pytest.raises(KeyError, match="no contestant"):
        harness.run_benchmark("lora", [], device="cpu", contestants=["nope"], progress=False)


# ================================================================ throughput, peaks, outputs


@pytest.mark.parametrize("name,model", [
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200 (H200 SXM figures)"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
    ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", "L40"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
    ("Tesla T4", "T4"),
    ("NVIDIA B200", "B200"),
])
def test_device_peaks_by_name(name, model):
    peaks = harness.device_peaks(name)
    assert peaks is not None and peaks["model"] == model
    assert peaks["gbps"] > 0 and peaks["float32"] > 0


def test_device_peaks_unknown_device():
    assert harness.device_peaks("Some Future GPU 9000") is None
    assert harness.peaks_for(__import__("torch").device("cpu"), "float32") is None


def test_add_throughput_uses_medians_and_peaks():
    record = {"work": {"flops": 4e12, "bytes": 2e9},
              "measurements": {"ours": {"median_ms": 2.0}, "peer": {"median_ms": 4.0}}}
    harness.add_throughput(record, {"model": "X", "gbps": 2000.0, "tflops": 1000.0})
    ours, peer = record["measurements"]["ours"], record["measurements"]["peer"]
    assert ours["tflops"] == pytest.approx(2000.0) and peer["tflops"] == pytest.approx(1000.0)
    assert ours["gbps"] == pytest.approx(1000.0) and peer["gbps"] == pytest.approx(500.0)
    assert ours["pct_peak_flops"] == pytest.approx(200.0)
    assert peer["pct_peak_bandwidth"] == pytest.approx(25.0)
    assert record["peak"]["model"] == "X"


def test_lora_work_counts_what_pytorch_counts():
    # the FLOPs of one step equal those torch's FlopCounterMode counts for the unfused
    # contestant (forward, and backward to x, A and B with W frozen)
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lora_ext.benchmark import lora as lora_family
    fam = harness.get_family("lora")
    case = fam.cases("quick", features=("48x80",), tokens=24, ranks=4, dtypes=("float32",),
                     dropouts=(0.0,))[0]
    runner = harness.build_runner(fam, "torch", case, fam.make_inputs(case, torch.device("cpu")),
                                  torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        runner.step()
    work = lora_family.lora_work(case)
    assert work["flops"] == counter.get_total_flops()
    t, i, o, r = 24, 48, 80, 4
    assert work["bytes"] == 4 * (3 * t * i + 2 * o * i + 2 * t * o + 3 * r * i + 3 * o * r)


def _tiny_doc(**kwargs):
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32,), tokens=8, dtypes=("float32",), dropouts=(0.0,))
    return harness.run_benchmark("lora", cases, device="cpu", repeats=2, warmup=0,
                                 contestants=["base", "lora_ext"], **kwargs)


def test_table_shows_throughput_only_on_gpu():
    doc = _tiny_doc(progress=False)
    res = doc["results"][0]
    assert res["work"]["flops"] > 0 and res["measurements"]["lora_ext"]["tflops"] > 0
    assert "TFLOP/s" not in harness.format_table(doc)      # CPU: JSON only
    # the same document as if timed on an H200: ours' throughput and % of its peak appear
    doc["environment"]["device_type"] = "cuda"
    harness.add_throughput(res, {"model": "H200 SXM", "gbps": 4800, "tflops": 67})
    text, markdown = harness.format_table(doc), harness.format_markdown(doc)
    for out in (text, markdown):
        assert "ours TFLOP/s" in out and "% peak FLOP/s" in out and "% peak GB/s" in out
        assert "H200 SXM" in out
    pct = res["measurements"]["lora_ext"]["pct_peak_flops"]
    assert f"{pct:.0f}%" in text


def test_progress_bar_goes_to_stderr(capsys):
    _tiny_doc(progress=True)
    err = capsys.readouterr().err
    assert "[1/1] lora-fp32-32x32" in err


def test_output_dir_gets_json_png_and_markdown(tmp_path, capsys):
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32,), tokens=8, dtypes=("float32",), dropouts=(0.0,))
    args = _parse(["--device", "cpu", "--repeats", "1", "--warmup", "0", "--no-progress",
                   "--output", str(tmp_path / "res")])
    assert harness.main(args, cases=cases) == 0
    files = sorted(p.name for p in (tmp_path / "res").iterdir())
    stems = {f.rsplit(".", 1)[0] for f in files}
    assert len(stems) == 1 and next(iter(stems)).startswith("lora-cpu-")
    assert {f.rsplit(".", 1)[1] for f in files} == ({"json", "md", "png"} if HAS_MATPLOTLIB
                                                     else {"json", "md"})
    md = next((tmp_path / "res").glob("*.md")).read_text()
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| dtype"))
    assert "ours ms" in lines[header] and "ours/base" in lines[header]
    assert set(lines[header + 1].replace("|", "").split()) <= {"---", "---:"}
    assert lines[header + 2].startswith("| fp32 | 32x32 |")
    doc = json.loads(next((tmp_path / "res").glob("*.json")).read_text())
    assert doc["environment"]["date_utc"] and "lora_ext_version" in doc["environment"]
    assert "MD:" in capsys.readouterr().out


def test_family_selection():
    assert harness.family_names(None) == ["lora"]
    assert harness.family_names(["all"]) == list(harness.FAMILIES)
    assert harness.family_names(["lora", "lora"]) == ["lora"]
    with pytest.raises(ValueError, match="unknown benchmark family 'nope'"):
        harness.family_names(["nope"])
    assert harness.main(_parse(["--family", "nope", "--device", "cpu"])) == 2
    # several families need --output, not single-file paths
    args = _parse(["--family", "all", "--device", "cpu", "--out-json", "x.json"])
    if len(harness.FAMILIES) > 1:
        assert harness.main(args) == 2


def test_time_budget_cuts_repeats_but_keeps_a_minimum(monkeypatch):
    from lora_ext.benchmark import _harness
    monkeypatch.setattr(_harness, "BUDGET_SLACK_S", 1e9)   # cut repeats, never skip (a busy machine)
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32, 48), tokens=8, dtypes=("float32",), dropouts=(0.0,))
    doc = harness.run_benchmark("lora", cases, device="cpu", repeats=10, warmup=1,
                                contestants=["base", "lora_ext"], progress=False, max_seconds=1e-6)
    for res in doc["results"]:
        assert res["stopped_early"]["repeats"] == harness.MIN_REPEATS
        assert all(m["n"] == harness.MIN_REPEATS for m in res["measurements"].values())
    assert "fewer repeats" in harness.format_table(doc)
    full = harness.run_benchmark("lora", cases[:1], device="cpu", repeats=4, warmup=0,
                                 contestants=["base", "lora_ext"], progress=False, max_seconds=None)
    assert "stopped_early" not in full["results"][0]
    assert all(m["n"] == 4 for m in full["results"][0]["measurements"].values())
    # the command line: --quick on a cpu has a budget unless --max-seconds 0
    assert _parse(["--max-seconds", "0"]).max_seconds == 0
    assert harness.DEFAULT_BUDGET_S[("cpu", "quick")] <= 100


def test_git_commit_of_a_checkout():
    # run from a git checkout of lora-ext (CI's clean clone): the JSON names the commit
    from pathlib import Path
    import subprocess
    root = Path(harness.__file__).resolve().parents[2]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
        pytest.skip("lora_ext is not imported from a git checkout")
    info = harness.git_commit()
    assert info["commit"] == head.stdout.strip() and isinstance(info["dirty"], bool)


def test_time_budget_skips_a_case_whose_first_call_says_it_cannot_fit(monkeypatch):
    # Pretend every step takes 1 s (as bf16 GEMMs do on CPUs without native bf16): with a 0.1 s
    # budget, 3 rounds of 2 contestants would take ~6 s, past the share plus the slack.
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32, 48), tokens=8, dtypes=("float32",), dropouts=(0.0,))[:2]
    from lora_ext.benchmark import _harness
    real = _harness._time_ms
    monkeypatch.setattr(_harness, "_time_ms", lambda fn, device, timer: real(fn, device, timer) + 1000.0)
    doc = harness.run_benchmark("lora", cases, device="cpu", repeats=10, warmup=2,
                                contestants=["base", "lora_ext"], progress=False, max_seconds=0.1)
    for res in doc["results"]:
        assert res["budget_skipped"]["estimated_s"] >= 6.0
        assert res["measurements"] == {}
        assert all(v is None for v in res["ratios"].values())
    table = harness.format_table(doc)
    assert "not timed" in table and "n/a" in table


def test_time_budget_drops_warmup_before_repeats(monkeypatch):
    from lora_ext.benchmark import _harness
    monkeypatch.setattr(_harness, "BUDGET_SLACK_S", 1e9)
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32, 48), tokens=8, dtypes=("float32",), dropouts=(0.0,))[:1]
    doc = harness.run_benchmark("lora", cases, device="cpu", repeats=5, warmup=3,
                                contestants=["base", "lora_ext"], progress=False, max_seconds=1e-6)
    res = doc["results"][0]
    assert res["warmup_cut"] == {"from": 3, "to": 0}
    assert all(m["n"] == harness.MIN_REPEATS for m in res["measurements"].values())
    assert "no warm-up rounds" in harness.format_table(doc)
    assert doc["config"]["elapsed_s"] > 0


def test_time_budget_predicts_a_slow_case_from_earlier_ones(monkeypatch):
    # The first case's first calls give seconds per FLOP; a later case of the same dtype with
    # 32768x the FLOPs is predicted to overrun and is skipped without a single call.
    from lora_ext.benchmark import _harness
    fam = harness.get_family("lora")
    small = fam.cases("quick", features=(32, 32), tokens=8, dtypes=("float32",), dropouts=(0.0,))[:1]
    big = fam.cases("quick", features=(1024, 1024), tokens=256, dtypes=("float32",), dropouts=(0.0,))[:1]
    calls = []
    real = _harness._time_ms

    def slow(fn, device, timer):
        calls.append(1)
        return real(fn, device, timer) + 50.0     # 50 ms a step at 32x32x8: the big case ~30 min
    monkeypatch.setattr(_harness, "_time_ms", slow)
    monkeypatch.setattr(_harness, "BUDGET_SLACK_S", 20.0)     # room for the small case on a busy machine
    doc = harness.run_benchmark("lora", small + big, device="cpu", repeats=3, warmup=0,
                                contestants=["base", "lora_ext"], progress=False, max_seconds=0.5)
    first, second = doc["results"]
    assert "budget_skipped" not in first and first["measurements"]
    assert second["budget_skipped"]["estimated_s"] > 100 and second["first_step_s"] == {}
    assert len(calls) == 2 + 2 * harness.MIN_REPEATS    # the big case made no call


def test_chart_and_table_go_beside_a_given_json_path(tmp_path, monkeypatch):
    from lora_ext.benchmark import _output
    repo_default = tmp_path / "default_place"
    monkeypatch.setattr(_output, "default_output_dir", lambda: repo_default)
    fam = harness.get_family("lora")
    cases = fam.cases("quick", features=(32, 48), tokens=8, dtypes=("float32",), dropouts=(0.0,))[:1]
    doc = harness.run_benchmark("lora", cases, device="cpu", repeats=1, warmup=0,
                                contestants=["base", "lora_ext"], progress=False)
    paths = _output.write_outputs(doc, torch.device("cpu"), json_path=tmp_path / "run.json")
    assert str(paths["json"]) == str(tmp_path / "run.json")
    assert str(paths["md"]) == str(tmp_path / "run.md")
    if paths["png"] is not None:       # matplotlib installed
        assert str(paths["png"]) == str(tmp_path / "run.png")
    assert not repo_default.exists()   # nothing written into the default place
