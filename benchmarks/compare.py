#!/usr/bin/env python
"""Side-by-side comparison of meta-learning implementations on the same data and weights.

    python benchmarks/compare.py                          # W1 and W3, 20 repeats
    python benchmarks/compare.py --workloads W2,W4 --slow-repeats 3
    python benchmarks/compare.py --memory                 # peak-RSS growth, W3, K = 1 5 10 20
    python benchmarks/compare.py --markdown out.md        # also write the report to a file

On a shared machine (other processes competing for the cores) run it with
OMP_WAIT_POLICY=PASSIVE: with libgomp's default spin-waiting, an OpenMP team whose other
thread is descheduled burns its time slice at every barrier, and a 1 ms meta-step can take
100 ms; the policy is printed in the machine section.

Workloads (float32, torch.set_num_threads(2), one fixed seeded meta-batch, one seeded
initial model copied into every implementation):

    W1  sinusoid MLP 1-40-40-1, K=10 support + 10 query, meta-batch 25: 2nd-order MAML, 1 step
    W3  Omniglot MLP 784-256-128-64-64-5, 5-way 1-shot, 15 queries/class, meta-batch 32:
        2nd-order MAML 1 and 5 steps, 1st-order MAML 1 and 5 steps, Reptile 5 steps
    W2  Omniglot conv4 (hidden 64, 28x28x1), same task shape: 2nd-order MAML, 1 and 5 steps
    W4  mini-ImageNet conv4 (hidden 32, 84x84x3), 5-way 1-shot, 15 queries/class,
        meta-batch 4: 2nd-order MAML, 5 steps (inner rate 0.01, the MAML paper's setting)
        (W2 and W4 take seconds per step: their repeat count is --slow-repeats)

Implementations: fastmeta backend="cpu" (when it can serve the call; otherwise the row says
why), fastmeta backend="torch" (the reference engine), torch.func (vmap + functional_call +
differentiable torch.func.grad), a plain per-task autograd loop, learn2learn 0.2.0 and
higher 0.2.1 (install with benchmarks/install_comparisons.sh; "not installed" otherwise).

Each meta-step is: zero the gradients, forward over the meta-batch, backward (Reptile: the
inner loops and theta - mean(phi) into .grad). Times are per meta-step after warm-up, each
measured over a block of consecutive meta-steps (--block-ms), as a training loop runs them.
Useful FLOPs are counted analytically (see bench_workloads.useful_flops) and compared to
this machine's float32 matmul peak, measured here with a large torch.mm on 2 threads.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_workloads as bw  # noqa: E402
import fastmeta  # noqa: E402

W3_ALGORITHMS = [bw.Algorithm("maml2", 1), bw.Algorithm("maml2", 5), bw.Algorithm("fomaml", 1),
                 bw.Algorithm("fomaml", 5), bw.Algorithm("reptile", 5)]
PLAN = {"W1": [bw.Algorithm("maml2", 1)], "W3": W3_ALGORITHMS,
        "W2": [bw.Algorithm("maml2", 1), bw.Algorithm("maml2", 5)],
        "W4": [bw.Algorithm("maml2", 5)]}
SLOW = ("W2", "W4")  # seconds per meta-step: --slow-repeats timed steps after one warm-up
MEMORY_STEPS = (1, 5, 10, 20)
MMAP_THRESHOLD = 1 << 20  # bytes, for the memory-mode children
REFERENCE = "fastmeta-torch"
COMPILED = "fastmeta-cpu"


# ---------------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> list[str]:
    info = fastmeta.backends.info()
    kernels = ", ".join(info.get("kernels", [])) or "none"
    return [
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores visible; "
        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()})",
        f"- threads: torch.set_num_threads({torch.get_num_threads()}); OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', '(unset: libgomp spins)')}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, "
        f"fastmeta {fastmeta.__version__} (compiled core: "
        f"{'yes, kernels: ' + kernels if info['core_available'] else 'no'})",
        f"- comparison packages: learn2learn {package_version('learn2learn')}, "
        f"higher {package_version('higher')}",
        f"- load average at start (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def matmul_peak() -> tuple[float, str]:
    """Best float32 torch.mm throughput (FLOP/s) on the current thread setting: many short
    tries, so that one of them lands in a quiet moment of a shared machine."""
    best, where = 0.0, ""
    for n, tries in ((2048, 20), (4096, 4)):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(tries):
            start = time.perf_counter()
            torch.mm(a, b)
            rate = 2 * n ** 3 / (time.perf_counter() - start)
            if rate > best:
                best, where = rate, f"torch.mm {n}x{n}"
    return best, where


# ---------------------------------------------------------------------------------------------
# Timing mode
# ---------------------------------------------------------------------------------------------
def run_cell(w: bw.Workload, algo: bw.Algorithm, impls, repeats: int, warmup: int,
             block_seconds: float, log) -> dict:
    """Per implementation: {"times": [...], "block": n, "grad": Tensor} or {"na": reason}.

    A training loop runs meta-steps back to back, so each implementation is timed over
    blocks of consecutive meta-steps (as many as take about ``block_seconds``, at least
    one), and "times" holds each block's time per meta-step. All implementations are built
    and warmed up first, then timed round-robin (block r of every implementation before
    block r + 1 of any), so that a change in the machine's load hits them alike.
    """
    results, steps, models = {}, {}, {}
    for impl in impls:
        log(f"  {w.key} {algo.label}: building and warming up {impl} ...")
        gc.collect()
        try:
            models[impl], steps[impl] = bw.build(impl, w, algo)
        except bw.Unavailable as error:
            results[impl] = {"na": str(error)}
            continue
        start = time.perf_counter()
        for _ in range(warmup):
            steps[impl]()
        per_step = (time.perf_counter() - start) / max(warmup, 1)
        block = max(1, min(1000, int(block_seconds / max(per_step, 1e-6))))
        results[impl] = {"times": [], "block": block}
    log(f"  {w.key} {algo.label}: timing {repeats} rounds of {len(steps)} implementations ...")
    for _ in range(repeats):
        for impl, step in steps.items():
            block = results[impl]["block"]
            start = time.perf_counter()
            for _ in range(block):
                step()
            results[impl]["times"].append((time.perf_counter() - start) / block)
    for impl, model in models.items():
        results[impl]["grad"] = bw.meta_gradient(model).detach().double()
    return results


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def timing_table(w: bw.Workload, algo: bw.Algorithm, impls, repeats, warmup, peak, results,
                 log) -> list[str]:
    flops = bw.useful_flops(w, algo)
    log(f"  {w.key} {algo.label}: float64 oracle gradient ...")
    oracle = bw.oracle_gradient(w, algo)
    ref = results.get(REFERENCE, {})
    ref_med = statistics.median(ref["times"]) if "times" in ref else None
    cpu = results.get(COMPILED, {})
    cpu_med = statistics.median(cpu["times"]) if "times" in cpu else None

    lines = [f"#### {w.key}: {algo.label}",
             "",
             f"{w.title}; useful FLOPs per meta-step: {flops / 1e9:.3g} GFLOP; "
             f"{repeats} timed rounds after {warmup} warm-up; each round times a block of "
             f"consecutive meta-steps per implementation (steps per block in the last column).",
             "",
             "| implementation | median ms | min ms | tasks/s | x fastmeta-cpu | x reference "
             "| GFLOP/s | % of peak | grad error vs float64 | steps/block |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for impl in impls:
        r = results[impl]
        if "na" in r:
            lines.append(f"| {impl} | n/a ({r['na']}) | | | | | | | | |")
            continue
        med, low = statistics.median(r["times"]), min(r["times"])
        vs_cpu = f"{med / cpu_med:.2f}" if cpu_med else "n/a"
        vs_ref = f"{med / ref_med:.2f}" if ref_med else "n/a"
        error = float((r["grad"] - oracle).abs().max() / oracle.abs().max())
        rate = flops / med
        lines.append(f"| {impl} | {fmt_ms(med)} | {fmt_ms(low)} | {w.tasks / med:.1f} | {vs_cpu} "
                     f"| {vs_ref} | {rate / 1e9:.2f} | {100 * rate / peak:.1f} | {error:.1e} "
                     f"| {r['block']} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# Memory mode: one fresh process per (implementation, inner steps)
# ---------------------------------------------------------------------------------------------
def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def memory_child(impl: str, steps: int) -> None:
    torch.set_num_threads(bw.NUM_THREADS)
    warnings.simplefilter("ignore")
    w = bw.omniglot_mlp_workload()
    algo = bw.Algorithm("maml2", steps)
    # Warm torch's one-time machinery (autograd engine, thread pool, allocator) on a tiny
    # double backward, so the growth below is the meta-step's own.
    x = torch.randn(4, 3, requires_grad=True)
    (g,) = torch.autograd.grad((x.tanh() ** 2).sum(), x, create_graph=True)
    g.sum().backward()
    model = w.fresh_model()
    result = {"impl": impl, "steps": steps}
    try:
        if impl.startswith("fastmeta-"):
            # Built without bw.build's probe step, which would itself raise the peak.
            backend = impl.split("-", 1)[1]
            learner = fastmeta.MAML(model, w.inner_lr, steps, loss=w.loss, backend=backend)

            def step():
                learner(w.support_x, w.support_y, w.query_x, w.query_y).backward()
        else:
            step = bw.IMPLEMENTATIONS[impl](w, algo, model)
        gc.collect()
        before = maxrss_mib()
        step()
        after = maxrss_mib()
        result.update(before_mib=before, after_mib=after)
    except (bw.Unavailable, ValueError) as error:
        result["na"] = str(error).replace("backend='cpu' cannot serve this call: ", "")
    print("RESULT " + json.dumps(result))


def memory_table(impls, log) -> list[str]:
    w = bw.omniglot_mlp_workload()
    params = sum(p.numel() for p in w.base_model.parameters())
    rows = {}
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and keeps
    # later ones on its heap, which makes the peak depend on the allocation history.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    for impl in impls:
        for steps in MEMORY_STEPS:
            log(f"  memory: {impl}, {steps} inner steps ...")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-child",
                                   impl, str(steps)], capture_output=True, text=True, env=env)
            found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows[impl, steps] = {"na": f"child failed: {tail}"}
            else:
                rows[impl, steps] = json.loads(found[-1][len("RESULT "):])
    lines = ["#### W3: peak resident memory growth of one 2nd-order MAML meta-step",
             "",
             f"{w.title}; {params} parameters. Each cell: ru_maxrss after minus before one "
             "meta-step (MiB), in a fresh process per cell, after torch's one-time warm-up, "
             f"with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (blocks above 1 MiB go straight "
             "back to the OS when freed, so the peak follows the live tensors). For scale: one "
             f"parameter-sized float32 copy for all {w.tasks} tasks is "
             f"{w.tasks * params * 4 / 2 ** 20:.0f} MiB.",
             "",
             "| implementation | " + " | ".join(f"K={k}" for k in MEMORY_STEPS) + " |",
             "|---|" + "---:|" * len(MEMORY_STEPS)]
    for impl in impls:
        cells = []
        for steps in MEMORY_STEPS:
            r = rows[impl, steps]
            cells.append(f"n/a ({r['na']})" if "na" in r else f"{r['after_mib'] - r['before_mib']:.0f}")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="W1,W3",
                        help="comma-separated subset of W1,W2,W3,W4 (default W1,W3; W2 and W4 "
                             "take minutes)")
    parser.add_argument("--repeats", type=int, default=20, help="timed meta-steps per cell (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed meta-steps first (default 3)")
    parser.add_argument("--block-ms", type=float, default=20.0,
                        help="each timed block runs consecutive meta-steps for about this long "
                             "(default 20; 0 times single meta-steps)")
    parser.add_argument("--slow-repeats", "--w2-repeats", type=int, default=3,
                        help="timed meta-steps for W2 and W4, with 1 warm-up (default 3)")
    parser.add_argument("--impls", default=",".join(bw.IMPLEMENTATIONS),
                        help=f"comma-separated subset of {','.join(bw.IMPLEMENTATIONS)}")
    parser.add_argument("--memory", action="store_true",
                        help="memory mode: peak-RSS growth of a 2nd-order MAML meta-step on W3 "
                             f"at K = {', '.join(map(str, MEMORY_STEPS))} inner steps")
    parser.add_argument("--memory-impls", default=f"{COMPILED},{REFERENCE}",
                        help="implementations for --memory (default fastmeta-cpu,fastmeta-torch)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="also write the markdown report to PATH")
    parser.add_argument("--_memory-child", nargs=2, metavar=("IMPL", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._memory_child:
        memory_child(args._memory_child[0], int(args._memory_child[1]))
        return 0

    torch.set_num_threads(bw.NUM_THREADS)
    warnings.simplefilter("ignore")  # fastmeta's "using the reference engine" notes, etc.

    def log(message):
        print(message, file=sys.stderr, flush=True)

    def check_impls(text):
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [n for n in names if n not in bw.IMPLEMENTATIONS]
        if unknown:
            parser.error(f"unknown implementation(s) {unknown}; choose from {list(bw.IMPLEMENTATIONS)}")
        return names

    header = ["### Machine", ""] + machine_info()
    header.append(f"- command: `python benchmarks/{os.path.basename(__file__)} "
                  f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    body = [""]
    if args.memory:
        body += ["### Memory", ""] + memory_table(check_impls(args.memory_impls), log)
    else:
        impls = check_impls(args.impls)
        keys = [k.strip().upper() for k in args.workloads.split(",") if k.strip()]
        bad = [k for k in keys if k not in PLAN]
        if bad:
            parser.error(f"unknown workload(s) {bad}; choose from {', '.join(PLAN)}")
        log("measuring the float32 matmul peak ...")
        peak_start, how_start = matmul_peak()
        cells = []
        for key in keys:
            w = bw.WORKLOADS[key]()
            repeats, warmup = (args.slow_repeats, 1) if key in SLOW else (args.repeats, args.warmup)
            for algo in PLAN[key]:
                results = run_cell(w, algo, impls, repeats, warmup, args.block_ms / 1e3, log)
                cells.append((w, algo, repeats, warmup, results))
        log("measuring the float32 matmul peak again ...")
        peak_end, how_end = matmul_peak()
        peak, how = max((peak_start, how_start), (peak_end, how_end))
        header.append(f"- float32 matmul peak (2 threads): {peak / 1e9:.1f} GFLOP/s (best {how} of "
                      f"20 x 2048 and 4 x 4096 tries, before and after the timings: "
                      f"{peak_start / 1e9:.1f} / {peak_end / 1e9:.1f}); '% of peak' uses the best")
        shown = None
        for w, algo, repeats, warmup, results in cells:
            if w.key != shown:
                body += [f"### {w.key}: {w.title}" + (f" ({w.notes})" if w.notes else ""), ""]
                shown = w.key
            body += timing_table(w, algo, impls, repeats, warmup, peak, results, log)
        body += ["Columns: x fastmeta-cpu / x reference = this median over that implementation's "
                 "median (above 1 is slower); tasks/s, GFLOP/s and % of peak use the median and the "
                 "analytic useful FLOPs; grad error vs float64 = max |g - g64| / max |g64|, g64 the "
                 "meta-gradient of the same weights and data in float64 (reference engine).", ""]
    header.append(f"- load average at end (1/5/15 min): "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    out = header + body
    text = "\n".join(out)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
