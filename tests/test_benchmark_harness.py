"""The benchmark harness (`lora-ext bench`) end to end on the CPU, at tiny sizes."""
import argparse
import importlib.util
import json

import pytest

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
