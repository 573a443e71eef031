"""`python3 build.py bench`: run every bench/bench_*.py and print its figures.

Each benchmark module has ``run(argv) -> None`` that prints its own lines and
names the machine it measured (device and CPU). Benchmarks print figures;
they assert nothing, and no test is timed. Select some with
`python3 build.py bench detect index` (substrings of module names); options after
the names go to every selected benchmark (`python3 build.py bench detect --full`).
"""
from __future__ import annotations

import importlib
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def machine() -> str:
    import os
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores; {gpu}; torch {torch.__version__}"


def main(argv) -> int:
    # names come first; everything from the first option on is for the benchmarks
    first_opt = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    wanted = argv[:first_opt]
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if wanted:
        names = [n for n in names if any(w in n for w in wanted)]
    print(f"MapCLIP benchmarks on: {machine()}", flush=True)
    for name in names:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        importlib.import_module(f"bench.{name}").run(argv[first_opt:])
        print(f"({name} took {time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
