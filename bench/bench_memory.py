"""Memory flat in raster size: peak memory of detect and index over an 8000^2 and
a 40000^2 raster, side by side, with the tiny model (test-tiny) on the CPU.

Each run is a fresh Python process (so nothing of this benchmark's own memory
counts) that loads the model and calls the engine (``detect`` in window mode,
224-px tiles, 2 x 2 windows, heatmap; ``build_index`` with 224-px tiles).
Two figures per run:

* **main RSS**: the peak resident set of the engine's process (``VmHWM``);
* **with children**: the main RSS plus the peak RSS of each child process
  (reader processes, their fork server, the resource tracker; their VmHWM
  sampled every 0.2 s): an upper bound of what the job costs the machine
  (pages a forked reader shares with the fork server count twice).

Goal (issue 16): the 40000^2 figure within 10 % of the 8000^2 one, and both
under 1.5 GB. The rasters are flat grey with a little texture, 512-px blocks,
deflate (a 40000^2 raster is a few MB on disk and written in about a minute;
every tile is real content, none is skipped). ``--sizes 8000,40000`` changes
the sizes; ``--only detect`` or ``--only index`` runs one command.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GOAL_MB = 1536
GOAL_GROWTH = 0.10

_CHILD = r"""
import sys, time
sys.path.insert(0, {root!r})
kind, raster, out = sys.argv[1:4]
from mapclip.engine.model.models import load_model
lm = load_model("test-tiny", device="cpu")
t0 = time.perf_counter()
if kind == "detect":
    from mapclip.engine.core.options import DetectOptions
    from mapclip.engine.detect import detect
    res = detect(raster, ["storage tanks"], lm, options=DetectOptions(
        tile_px=224, window=2, batch_size=64, heatmap=True, refine=False))
    n = res.tiles
else:
    from mapclip.engine.core.options import IndexOptions
    from mapclip.engine.archive.build import build_index
    info = build_index([raster], out, lm, IndexOptions(tile_px=224, batch_size=64))
    n = info.embedded
secs = time.perf_counter() - t0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("RESULT", n, secs, int(hwm) / 1024.0)
"""


def _children() -> dict:
    kids: dict = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _tree_hwm(root: int, seen: dict) -> None:
    """Record the peak RSS (VmHWM) of every process under ``root`` in ``seen``."""
    kids = _children()
    todo = list(kids.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(kids.get(pid, []))
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        seen[pid] = max(seen.get(pid, 0.0), int(line.split()[1]) / 1024.0)
                        break
        except OSError:
            pass


def measure(kind: str, raster: Path, tmp: Path) -> dict:
    env = dict(os.environ, MAPCLIP_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    out = tmp / f"index-{raster.stem}"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=str(ROOT)), kind,
                             str(raster), str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    others: dict = {}

    def sample():
        while proc.poll() is None:
            _tree_hwm(proc.pid, others)
            time.sleep(0.2)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    line = next((ln for ln in stdout.splitlines() if ln.startswith("RESULT")), None)
    if proc.returncode != 0 or line is None:
        tail = (stderr or "").strip().splitlines()[-3:]
        return {"error": f"exit code {proc.returncode}: {' | '.join(tail)}"}
    _, n, secs, hwm = line.split()
    return {"tiles": int(n), "seconds": float(secs), "rss": float(hwm),
            "tree": float(hwm) + sum(others.values()), "n_procs": len(others)}


def run(argv) -> None:
    from bench.fixtures import cached
    ap = argparse.ArgumentParser(prog="bench_memory", add_help=False)
    ap.add_argument("--sizes", default="8000,40000")
    ap.add_argument("--only", default="detect,index")
    args, _ = ap.parse_known_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = [k for k in ("detect", "index") if k in args.only.split(",")]
    print(f"memory flat in raster size: tiny model on the CPU, 224-px tiles; rasters "
          f"{' and '.join(f'{s}^2' for s in sizes)} (flat grey + texture, deflate, 512-px "
          f"blocks); {os.cpu_count()} cores; reader processes: "
          f"{os.environ.get('MAPCLIP_READ_WORKERS', 'auto')}", flush=True)
    rasters = {}
    for s in sizes:
        t0 = time.perf_counter()
        rasters[s], made = cached(f"flat_{s}_u8x3_b512_deflate.tif", s, s, CACHE,
                                  block=512, compress="deflate", content="flat")
        if made:
            print(f"  generated {rasters[s].name} in {time.perf_counter() - t0:.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="mapclip-bench-memory-") as tmp:
        for kind in kinds:
            res = {s: measure(kind, rasters[s], Path(tmp)) for s in sizes}
            for s in sizes:
                m = res[s]
                if "error" in m:
                    print(f"  {kind:<6} {s:>6}^2: FAILED ({m['error']})", flush=True)
                    continue
                print(f"  {kind:<6} {s:>6}^2: {m['tiles']:>7} tiles in {m['seconds']:6.1f} s; "
                      f"main RSS {m['rss']:7.0f} MB, with its {m['n_procs']} child process(es) "
                      f"{m['tree']:7.0f} MB   goal < {GOAL_MB} MB "
                      f"[{'met' if m['tree'] < GOAL_MB else 'NOT met'}]",
                      flush=True)
            ok = [s for s in sizes if "error" not in res[s]]
            if len(ok) >= 2:
                a, b = res[ok[0]], res[ok[-1]]
                for key, label in (("rss", "main RSS"), ("tree", "with children")):
                    g = b[key] / max(1e-9, a[key]) - 1
                    print(f"  {kind:<6} {label} {ok[-1]}^2 vs {ok[0]}^2: {g:+.1%}   goal within "
                          f"{GOAL_GROWTH:.0%} [{'met' if abs(g) <= GOAL_GROWTH else 'NOT met'}]",
                          flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
