"""The benchmark suite: `python -m benchmarks [options]` (from the repository root, or `make bench`).

Measures this library's ops against the released DistiLLM-2 trainer's naive PyTorch code, `torch.compile`
of that code, its own "torch" backend and Liger-Kernel (where Liger computes the same function), and writes
a table (stdout; a progress bar on stderr), a CSV, a markdown summary and PNG plots to `--out`.

Suites (`--suite`, comma-separated or "all"):
  skew_divergence  fused_skl, fused_srkl on logits                     (benchmarks/skew_divergence.py)
  fused_linear     fused_linear_skl, fused_linear_srkl from hidden      (benchmarks/fused_linear.py)
  objective        one DistiLLM-2 objective step, DistiLLM2Loss         (benchmarks/objective.py)
  training_step    one optimizer step of a small Llama, tokens/s        (benchmarks/training_step.py)
Sizes per device: benchmarks/sizes.py. Implementations: benchmarks/implementations.py.

Examples:
  python -m benchmarks                          # everything, default sizes of the device (CUDA if present)
  python -m benchmarks --quick                  # a smoke run, ~1.5 min on 2 CPU cores, to benchmarks/results/quick/
  python -m benchmarks --suite fused_linear --N 8192 --V 128256 --impls triton,liger --out /tmp/fl
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import environment, implementations, sizes
from .report import console, ratios, schema, write_all
from .environment import ROOT
from .runner import Pool
from .worker import SUITES

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_REPEATS = {"cpu": 3, "cuda": 10}
DEFAULT_WARMUP = {"cpu": 1, "cuda": 3}
# --quick leaves out the compiled baseline unless --impls names it: torch.compile costs ~10 s per shape, which
# was most of a quick run (3 min on 2 cores). Without it, every suite, --threads 1 on 2 shared Xeon cores at load
# 5: 94 s wall clock, 46 s of CPU time.
QUICK_RUN = "about 1.5 minutes on 2 CPU cores; naive_compiled is left out unless --impls names it"
QUICK_EXCLUDED = ("naive_compiled",)


def _list(text):
    return [item.strip() for item in text.split(",") if item.strip()] if text else None


def _ints(text):
    return [int(item) for item in _list(text)] if text else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="all", help="all, or a comma-separated subset of: " + ", ".join(SUITES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke run: tiny sizes, 2 repeats ({QUICK_RUN.replace('%', '%%')})")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default: CPU 3, CUDA 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: CPU 1, CUDA 3)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<device>, quick: benchmarks/results/quick)")
    parser.add_argument("--impls", default=None, help="comma-separated subset of: " + ", ".join(implementations.IMPLEMENTATIONS))
    parser.add_argument("--ops", default=None, help="comma-separated subset of the suites' ops")
    parser.add_argument("--modes", default=None, help="comma-separated subset of: fwd, fwd+bwd")
    parser.add_argument("--dtypes", default=None, help="comma-separated subset of: bfloat16, float32")
    parser.add_argument("--N", default=None, help="token counts replacing the defaults' (comma-separated)")
    parser.add_argument("--V", default=None, help="vocabulary sizes replacing the defaults' (comma-separated)")
    parser.add_argument("--isolation", choices=("impl", "case"), default="impl",
                        help="one worker process per implementation (default) or per case (see benchmarks/runner.py)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of the workers (OMP_NUM_THREADS); default: torch's default (all cores)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of the other suites from --out's existing results.csv (to run the suites "
                             "one at a time into one report)")
    args = parser.parse_args(argv)
    args.suites = list(SUITES) if args.suite == "all" else _list(args.suite)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {unknown}; known: {list(SUITES)}")
    args.impl_list = _list(args.impls)
    bad = [i for i in args.impl_list or [] if i not in implementations.IMPLEMENTATIONS]
    if bad:
        parser.error(f"unknown implementation(s) {bad}; known: {list(implementations.IMPLEMENTATIONS)}")
    return args


def plan(args, device_type: str) -> list:
    """[(suite module, shape, op, impl, modes)], shape by shape, each shape's implementations in turn."""
    tasks = []
    for name in args.suites:
        suite = SUITES[name]
        ops = [op for op in suite.OPS if not args.ops or op in _list(args.ops)]
        modes = [mode for mode in suite.MODES if not args.modes or mode in _list(args.modes) or mode == "step"]
        impl_names = [impl for impl in suite.IMPLS if (impl in args.impl_list if args.impl_list else
                                                       not (args.quick and impl in QUICK_EXCLUDED))]
        for shape in sizes.shapes(name, device_type, args.quick, _list(args.dtypes), _ints(args.N), _ints(args.V)):
            for op in ops:
                for impl in impl_names:
                    tasks.append((suite, shape, op, impl, modes))
    return tasks


def skip_reason(suite, op: str, impl: str, device) -> str:
    if hasattr(suite, "unavailable_reason") and suite.unavailable_reason():
        return suite.unavailable_reason()
    return suite.not_comparable(impl, op) or implementations.unavailable_reason(impl, device) or ""


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available to torch", file=sys.stderr)
        return 2
    device = torch.device(device_type)
    repeats = args.repeats or (2 if args.quick else DEFAULT_REPEATS[device_type])
    warmup = args.warmup or DEFAULT_WARMUP[device_type]
    out = args.out or (RESULTS / ("quick" if args.quick else device_type))
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan(args, device_type)
    started = time.time()

    pool = Pool(args.isolation, log_dir=out / "logs", threads=args.threads)
    try:
        messages = pool.run("environment", {"kind": "environment", "device": device_type, "quick": args.quick,
                                            "repeats": 5})
        pool_environment = next((m["environment"] for m in messages if "environment" in m), None)
        if pool_environment is None:
            print(f"could not describe the device: {messages}", file=sys.stderr)
            return 1
        pool.close()  # the ceilings' buffers go with it
        context = {"date": environment.utc_now(), "commit": environment.commit(), **pool_environment}
        console.print_header(context, args, repeats, warmup)

        progress = console.progress(total=sum(len(t[4]) for t in tasks))
        rows = []
        for suite, shape, op, impl, modes in tasks:
            progress.set_description(f"{suite.NAME} {op} {shape['dtype']} {schema.shape_text(shape)} {impl}")
            reason = skip_reason(suite, op, impl, device)
            if reason:
                results = [{"mode": mode, "status": "skipped", "note": reason} for mode in modes]
            else:
                task = {"kind": "case", "device": device_type, "suite": suite.NAME, "op": op, "impl": impl,
                        "shape": shape, "modes": modes, "warmup": 2 if suite.NAME == "training_step" else warmup,
                        "repeats": repeats}
                messages = pool.run(impl, task)
                results = [m["result"] for m in messages if "result" in m]
                errors = [m["error"] for m in messages if "error" in m]
                done = {r["mode"] for r in results}
                results += [{"mode": mode, "status": "error", "note": "; ".join(errors) or "no result"}
                            for mode in modes if mode not in done]
            for result in results:
                rows.append(schema.make_row(context, suite, shape, op, impl, result))
                progress.update(1)
        progress.close()
    finally:
        pool.close()

    ratios.add_ratios(rows)
    previous = out / "results.csv"
    if args.merge and previous.exists():
        rows = [row for row in schema.read_csv(previous) if row["suite"] not in args.suites] + rows
    command = "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    console.print_tables(rows)
    written = write_all(rows, out, context, command=command, plots=not args.no_plots,
                               elapsed_s=time.time() - started)
    print(f"\n# {len(rows)} rows in {time.time() - started:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
