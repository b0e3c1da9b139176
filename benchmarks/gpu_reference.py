"""Times the torch reference engine on a CUDA device beside torch.func and a per-task loop.

The compiled core has no CUDA kernels yet, so on a GPU fastmeta runs its reference engine;
this records what that costs, for the CUDA kernels to beat. Run on a machine with a GPU:

    python benchmarks/gpu_reference.py [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_workloads as bw  # noqa: E402

IMPLS = {"fastmeta torch": bw.fastmeta_impl("torch"), "torch.func": bw.torch_func_impl,
         "per-task loop": bw.loop_impl}


def time_step(step, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_reference.py: no CUDA device")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print("| workload | algorithm | implementation | median ms | min ms | tasks/s |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    cases = [("W1", bw.Algorithm("maml2", 1)), ("W3", bw.Algorithm("maml2", 1)),
             ("W3", bw.Algorithm("maml2", 5)), ("W2", bw.Algorithm("maml2", 1)),
             ("W2", bw.Algorithm("maml2", 5))]
    for key, algo in cases:
        workload = bw.WORKLOADS[key]()
        for name in ("support_x", "support_y", "query_x", "query_y"):
            setattr(workload, name, getattr(workload, name).to(device))
        for impl_name, build in IMPLS.items():
            model = workload.fresh_model().to(device)
            try:
                step = build(workload, algo, model)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"| {key} | {algo.label} | {impl_name} | failed: {error} | | |")
                continue
            times = time_step(step, args.repeats)
            median = statistics.median(times)
            print(f"| {key} | {algo.label} | {impl_name} | {median * 1e3:.2f} | "
                  f"{min(times) * 1e3:.2f} | {workload.tasks / median:.0f} |", flush=True)


if __name__ == "__main__":
    main()
