"""`lora-ext` command line: `info` (build facts and devices) and `bench` (the benchmark harness)."""
import argparse
import json
import sys


def build_report() -> dict:
    """Build facts of lora_ext._C plus what this process can see."""
    import torch

    import lora_ext

    report = dict(lora_ext.BUILD_INFO)
    report["installed_torch"] = torch.__version__
    report["cuda_kernels_present"] = torch._C._dispatch_has_kernel_for_dispatch_key(
        "lora_ext::lora_linear_forward", "CUDA")
    report["cpu_capability"], report["cpu_capability_best"] = lora_ext._C.cpu_capability()
    report["gpu_visible"] = torch.cuda.is_available()
    report["gpu_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return report


def cmd_info(args) -> int:
    report = build_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_bench(args) -> int:
    from . import benchmark

    return benchmark.main(args)


def argv_command(argv) -> str | None:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lora-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print build facts, CUDA kernels and visible GPUs")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="time lora-ext beside PEFT and plain PyTorch")
    if argv_command(argv) == "bench":  # `info` must work even where the harness cannot import
        from . import benchmark

        benchmark.add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
