"""pytest plugin: run PEFT's own tests/test_custom_models.py (LoraConfig cases) against lora-ext.

Loaded by run_peft_suite.sh (`-p lora_ext_peft_plugin`); the mode comes from
LORA_EXT_SUITE_MODE (or --lora-ext-mode):

- stock:      plain PEFT, the baseline.
- ours:       PEFT's get_peft_model and PeftModel (in the test modules and in the `peft`
              namespace) are lora_ext's; every peft.LoraConfig handed to lora_ext is
              converted with to_dict/from_dict into a lora_ext.LoraConfig.
- accelerate: plain PEFT, then lora_ext.accelerate(model) on every model that
              get_peft_model / PeftModel.from_pretrained return. Forwards of PEFT LoRA
              layers are counted, and how many of them ran a lora_ext op (the fused path).
              LORA_EXT_SUITE_SKIP_EMPTY=1 skips accelerate on models without a LoRA layer
              it swaps (where older accelerates raised), to measure everything else.

Only the tests whose `config_cls` parameter is peft.LoraConfig are kept. At the end a summary
(outcome counts, each test's outcome and first error line, for accelerate the fused share) is
printed and written as JSON to LORA_EXT_SUITE_JSON (or --lora-ext-json) when given.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import sys
from pathlib import Path

import pytest

MODES = ("stock", "ours", "accelerate")
# lora_ext.ops entry points that do a layer's LoRA computation (dropout masks, NF4
# (de)quantisation and segment helpers alone do not make a forward "fused")
_COMPUTE_OPS = ("lora_linear", "dora_linear", "lora_embedding", "lora_conv", "dora_conv", "nf4_matmul", "lora_shrink",
                "lora_expand", "lora_shrink_sgmv", "lora_expand_sgmv")


def pytest_addoption(parser):
    group = parser.getgroup("lora-ext", "running PEFT's tests against lora-ext")
    group.addoption("--lora-ext-mode", choices=MODES, default=None,
                    help="stock | ours | accelerate (default: $LORA_EXT_SUITE_MODE, else stock)")
    group.addoption("--lora-ext-json", default=None,
                    help="write the summary here (default: $LORA_EXT_SUITE_JSON)")


class _State:
    mode = "stock"
    json_path: str | None = None
    selected = 0
    deselected = 0
    outcomes: dict[str, str] = {}
    errors: dict[str, str] = {}
    # accelerate mode: per layer class, [LoRA forwards, fused forwards]
    forwards: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    fallback_reasons: collections.Counter = collections.Counter()
    accelerate_errors = 0
    accelerate_skipped = 0  # LORA_EXT_SUITE_SKIP_EMPTY=1: models with no LoRA Linear not passed to accelerate


S = _State()


# ----------------------------------------------------------------------------- config


def pytest_configure(config):
    mode = config.getoption("--lora-ext-mode") or os.environ.get("LORA_EXT_SUITE_MODE", "stock")
    if mode not in MODES:
        raise pytest.UsageError(f"lora-ext mode must be one of {MODES}, got {mode!r}")
    S.mode = mode
    S.json_path = config.getoption("--lora-ext-json") or os.environ.get("LORA_EXT_SUITE_JSON") or None
    import lora_ext
    print(f"lora-ext PEFT suite: mode={mode}, lora_ext from {lora_ext.__file__}", file=sys.stderr)
    if mode == "ours":
        _redirect_peft_to_ours()
    elif mode == "accelerate":
        _accelerate_peft_models()
        _count_lora_forwards()


def _test_modules():
    """The copied PEFT test modules (they live in the scratch tests/ package)."""
    for name, module in list(sys.modules.items()):
        if name == "tests" or name.startswith("tests."):
            yield module


def _set_everywhere(name: str, value) -> None:
    """Bind `name` in the peft namespace and in every PEFT test module that imported it."""
    import peft
    setattr(peft, name, value)
    for module in _test_modules():
        if name in vars(module):
            setattr(module, name, value)


# ----------------------------------------------------------------------------- ours


def _to_ours(value):
    import lora_ext
    import peft
    if isinstance(value, peft.LoraConfig):
        return lora_ext.LoraConfig.from_dict(value.to_dict())
    return value


def _converting(fn):
    """fn with every peft.LoraConfig argument converted into a lora_ext.LoraConfig."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_to_ours(a) for a in args)
        kwargs = {k: _to_ours(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)
    return wrapper


def _redirect_peft_to_ours() -> None:
    import lora_ext
    import peft
    from lora_ext import peft_model as ours

    peft_get_peft_model = peft.get_peft_model

    def get_peft_model(model, peft_config, *args, **kwargs):
        if isinstance(peft_config, peft.LoraConfig):
            return lora_ext.get_peft_model(model, _to_ours(peft_config), *args, **kwargs)
        return peft_get_peft_model(model, peft_config, *args, **kwargs)  # other tuners stay PEFT's

    # Every lora_ext entry point that takes a config accepts what the tests build (peft
    # configs), as a lora_ext user's code would hand it a lora_ext.LoraConfig.
    cls = ours.PeftModel
    cls.__init__ = _converting(cls.__init__)
    cls.add_adapter = _converting(cls.add_adapter)
    cls.from_pretrained = classmethod(_converting(cls.from_pretrained.__func__))
    S.redirect = (get_peft_model, cls)


# ----------------------------------------------------------------------------- accelerate


def _accelerated(model):
    import importlib

    import lora_ext
    if os.environ.get("LORA_EXT_SUITE_SKIP_EMPTY") == "1":
        # Measure the rest: leave models without any swappable LoRA layer alone instead of
        # letting accelerate warn about them.
        plain, fused = importlib.import_module("lora_ext.accelerate")._lora_layers(model)
        if not plain and not fused:
            S.accelerate_skipped += 1
            return model
    try:
        return lora_ext.accelerate(model)
    except Exception:
        S.accelerate_errors += 1
        raise


def _accelerate_peft_models() -> None:
    import peft
    peft_get_peft_model = peft.get_peft_model

    def get_peft_model(*args, **kwargs):
        return _accelerated(peft_get_peft_model(*args, **kwargs))

    from_pretrained = peft.PeftModel.from_pretrained.__func__

    def accelerated_from_pretrained(cls, *args, **kwargs):
        return _accelerated(from_pretrained(cls, *args, **kwargs))

    peft.PeftModel.from_pretrained = classmethod(accelerated_from_pretrained)
    S.redirect = (get_peft_model, None)


_stack: list[list] = []  # [layer, fused?] of the LoRA layer forwards running now, innermost last


def _count_lora_forwards() -> None:
    """Count forwards of PEFT LoRA layers and whether each called a lora_ext compute op.

    Wraps forward on the classes (no global hooks: those make accelerate fall back)."""
    import importlib

    import lora_ext
    acc = importlib.import_module("lora_ext.accelerate")  # the module: lora_ext.accelerate is the function
    from peft.tuners.lora.layer import LoraLayer

    def wrap_op(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            if _stack:
                _stack[-1][1] = True
            return fn(*args, **kwargs)
        return op

    for name in _COMPUTE_OPS:
        setattr(lora_ext.ops, name, wrap_op(getattr(lora_ext.ops, name)))

    def wrap_forward(fn):
        @functools.wraps(fn)
        def forward(self, *args, **kwargs):
            if any(entry[0] is self for entry in _stack):  # a fused layer falling back to PEFT's forward
                return fn(self, *args, **kwargs)
            entry = [self, False]
            _stack.append(entry)
            try:
                return fn(self, *args, **kwargs)
            finally:
                _stack.pop()
                if _runs_lora(self):
                    _record(self, entry[1], args, acc)
        return forward

    classes, todo = set(), [LoraLayer, acc._FusedForward, acc._FusedEmbeddingForward, acc._FusedConvForward,
                            *set(acc._swappable().values())]
    while todo:
        cls = todo.pop()
        if cls not in classes:
            classes.add(cls)
            todo.extend(cls.__subclasses__())
    for cls in classes:
        if "forward" in vars(cls):
            cls.forward = wrap_forward(vars(cls)["forward"])


def _runs_lora(layer) -> bool:
    """Whether this forward computes a LoRA term (not merged, not disabled, an active adapter here)."""
    if getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return False
    names = set(getattr(layer, "lora_A", {})) | set(getattr(layer, "lora_embedding_A", {}))
    return any(name in names for name in getattr(layer, "active_adapters", ()))


def _record(layer, fused: bool, args, acc) -> None:
    from torch import nn
    kind = type(layer).__name__
    counts = S.forwards[kind]
    counts[0] += 1
    counts[1] += int(fused)
    if fused:
        return
    if type(layer) not in set(acc._swappable().values()):
        reason = f"{kind} layer: not swapped by accelerate"
    else:
        reason = acc._static_reason(layer)
        if reason is None and kind == "FusedLoraEmbedding":
            reason = "a per-call condition (extra forward arguments, global hooks, index dtype, ...)"
        elif reason is None and kind != "FusedLoraLinear":  # a conv
            drops = [layer.lora_dropout[n] for n in layer.active_adapters if n in layer.lora_dropout]
            if any(isinstance(d, nn.Dropout) and d.training and d.p > 0 for d in drops):
                reason = "conv: dropout in training (the merged weight cannot drop the adapter's input)"
            else:
                reason = "a per-call condition (autocast, input dtype, extra forward arguments, global hooks, ...)"
        elif reason is None:
            x = args[0] if args else None
            found = acc._base_weight_and_bias(layer.base_layer)
            if x is not None and found is not None and getattr(x, "dtype", None) != found[0].dtype:
                reason = f"input dtype {x.dtype} differs from base weight dtype {found[0].dtype}"
            else:
                reason = "a per-call condition (autocast, extra forward arguments, global hooks, ...)"
    S.fallback_reasons[reason] += 1


# ----------------------------------------------------------------------------- collection


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    import peft
    if S.mode in ("ours", "accelerate"):
        get_peft_model, peft_model_cls = S.redirect
        _set_everywhere("get_peft_model", get_peft_model)
        if peft_model_cls is not None:
            _set_everywhere("PeftModel", peft_model_cls)
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("config_cls") is peft.LoraConfig:
            keep.append(item)
        else:
            drop.append(item)
    shard = os.environ.get("LORA_EXT_SUITE_SLICE")  # "START:STOP" of the selected tests, to split a run
    if shard:
        start, _, stop = shard.partition(":")
        kept = keep[int(start or 0):int(stop) if stop else None]
        kept_ids = {id(item) for item in kept}
        drop += [item for item in keep if id(item) not in kept_ids]
        keep = kept
    items[:] = keep
    if drop:
        config.hook.pytest_deselected(items=drop)
    S.selected, S.deselected = len(keep), len(drop)
    print(f"\nlora-ext PEFT suite: selected {len(keep)} tests whose config_cls is LoraConfig "
          f"(deselected {len(drop)})", file=sys.stderr)


# ----------------------------------------------------------------------------- outcomes


def _first_line(excinfo) -> str:
    """The exception's first line; for assertions also where in PEFT's test code they failed
    (a bare `assert x` has no message, and grouping needs to tell them apart)."""
    text = str(excinfo.value).strip().splitlines()
    line = f"{excinfo.typename}: {text[0] if text else ''}"[:300]
    if isinstance(excinfo.value, AssertionError):
        for entry in reversed(excinfo.traceback):
            path = Path(str(entry.path))
            if path.parent.name == "tests":
                source = str(entry.statement).strip().splitlines()
                line += f" [at {path.name}:{entry.lineno + 1}: {source[0][:120] if source else ''}]"
                break
    return line


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    nodeid = item.nodeid
    if report.when == "call" or report.outcome != "passed":
        if report.skipped:
            state = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.failed:
            state = "failed" if report.when == "call" else "error"
            if call.excinfo is not None:
                S.errors.setdefault(nodeid, _first_line(call.excinfo))
        else:
            state = "xpassed" if hasattr(report, "wasxfail") else "passed"
        # a teardown error after a passed call still makes the test not pass
        if S.outcomes.get(nodeid) not in ("failed", "error"):
            S.outcomes[nodeid] = state
    if report.when == "teardown" and S.json_path and len(S.outcomes) % 100 == 0:
        _write_json()  # a run cut short still leaves its counts so far


def _summary() -> dict:
    counts = collections.Counter(S.outcomes.values())
    summary = {
        "mode": S.mode,
        "selected": S.selected,
        "ran": len(S.outcomes),
        "counts": {k: counts.get(k, 0) for k in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")},
    }
    if S.mode == "accelerate":
        total = sum(c[0] for c in S.forwards.values())
        fused = sum(c[1] for c in S.forwards.values())
        summary["lora_forwards"] = total
        summary["fused_forwards"] = fused
        summary["fallback_forwards"] = total - fused
        summary["fused_share"] = round(fused / total, 4) if total else None
        summary["forwards_by_layer_class"] = {k: {"forwards": v[0], "fused": v[1]}
                                              for k, v in sorted(S.forwards.items())}
        summary["fallback_reasons"] = dict(S.fallback_reasons.most_common())
        summary["accelerate_calls_that_raised"] = S.accelerate_errors
        summary["accelerate_calls_skipped_no_lora_linear"] = S.accelerate_skipped
    summary["top_errors"] = dict(collections.Counter(S.errors.values()).most_common(25))
    summary["outcomes"] = dict(sorted(S.outcomes.items()))
    summary["errors"] = dict(sorted(S.errors.items()))
    return summary


def _write_json(summary: dict | None = None) -> None:
    Path(S.json_path).write_text(json.dumps(summary or _summary(), indent=1) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    summary = _summary()
    short = {k: v for k, v in summary.items() if k not in ("outcomes", "errors")}
    tr = terminalreporter
    tr.section(f"lora-ext PEFT suite ({S.mode})")
    tr.write_line(json.dumps(short, indent=1))
    if S.mode == "accelerate":
        share = summary["fused_share"]
        tr.write_line(f"LoRA layer forwards: {summary['lora_forwards']}, fused: {summary['fused_forwards']}, "
                      f"fell back: {summary['fallback_forwards']}, fused share: "
                      f"{'n/a' if share is None else f'{share:.1%}'}")
    if S.json_path:
        _write_json(summary)
        tr.write_line(f"summary written to {S.json_path}")
