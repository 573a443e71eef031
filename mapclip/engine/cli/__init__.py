"""The `python -m engine` command line.

Each subcommand lives in its own module in this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed arguments and returning an exit code. Errors the
user can cause (:class:`engine.core.errors.MapClipError`) print one line naming the
problem and one naming the fix, and exit with the error's code (2 for usage);
nothing else is caught, so real bugs keep their tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import signal
import sys
import threading
from typing import Any, List, Optional, Tuple

from ..core.errors import Cancelled, MapClipError, UsageError, from_foreign, worded

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = ("models", "detect", "index", "search", "count", "classify", "caption", "finetune", "convert",
            "dedup", "eval", "cache")


def _command_module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that subcommand is built in full.

    Building one subcommand imports only its module, so a command that needs
    no torch (convert, dedup) starts without importing it.
    """
    parser = argparse.ArgumentParser(
        prog="python -m engine",
        description="MapCLIP: search rasters by free text with remote-sensing CLIP models.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"MapCLIP {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)  # a placeholder: only the command being run is built
            continue
        _command_module(name).register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    previous = _terminate_as_interrupt()
    try:
        _refuse_undecodable(args)
        return int(args.func(args) or 0)
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MapClipError as exc:
        message, hint = worded(exc, flag)
        print_error(message, hint)
        return exc.exit_code
    except MemoryError:
        print_error("out of memory",
                    "work on less at once: a smaller --tile, --batch-size or --extent")
        return 1
    except Exception as exc:  # noqa: BLE001 - only the user's file-system errors are caught
        error = from_foreign(exc)
        if error is None:
            raise  # a bug keeps its traceback
        print_error(*worded(error, flag))
        return error.exit_code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _refuse_undecodable(args: argparse.Namespace) -> None:
    """A path typed with bytes that are not UTF-8 is refused before any work:
    GDAL, the reports and the manifests could not write it."""
    for value in vars(args).values():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not is_utf8(v):
                raise not_utf8(v)


def _one_line(text: str) -> str:
    """A message as one plain line: terminal colour codes removed, whitespace folded."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(text))
    return " ".join(text.split())


def print_error(message: str, hint: Optional[str]) -> None:
    """The two lines every user error prints: ``error: ...`` and ``  fix: ...``."""
    print(f"error: {_one_line(message)}", file=sys.stderr)
    if hint:
        print(f"  fix: {_one_line(hint)}", file=sys.stderr)


def _terminate_as_interrupt():
    """SIGTERM (a `kill`, a closed session) stops a run like Ctrl-C: temporary
    outputs are removed on the way out instead of being left behind. Returns the
    handler it replaced (restored when the command returns), or None."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main thread
        return None


# ---------------------------------------------------------------- helpers --
# the CLI's names for engine options are the engine messages' own (core.errors)
from ..core.errors import FLAGS, flag  # noqa: E402,F401
from ..core.errors import is_utf8, not_utf8
from ..core.options import CLS_TOKEN_LAMBDA_HELP, parse_bands as parse, parse_read_workers
from ..model.presets import DEFAULT_MODEL


def model_default_help(name: str) -> str:
    """Help text for an option whose default comes from the model (engine.core.options.ModelDefaults)."""
    from ..core.options import GENERIC_DEFAULTS  # deferred: a test replaces it at call time
    generic = getattr(GENERIC_DEFAULTS, name)
    most = "none" if generic is None else generic
    return (f"default: the model's own ({most} unless the model says otherwise; "
            f"`python -m engine models` lists each model's defaults)")


def add_model_args(p: argparse.ArgumentParser, default_help: str = "") -> None:
    """--model (default: the default preset; ``default_help`` says what comes first),
    --device, --precision, shared by every command that runs a model."""
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="SPEC",
                   help="preset name, ARCH:TAG, ARCH:CHECKPOINT, hf-hub:ORG/NAME or a model folder "
                        f"(see `python -m engine models`); default {default_help}{DEFAULT_MODEL}")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 on CUDA (fp16 without bf16), fp32 elsewhere")


def tqdm_progress(desc: str, unit: str = "it"):
    """A progress(done, total) callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm
    bar = tqdm(total=0, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
               disable=None)

    def progress(done: int, total: int) -> None:
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        bar.n = done
        bar.refresh()

    progress.close = bar.close  # type: ignore[attr-defined]
    return progress


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def map_bounds(bounds, crs: Optional[str]) -> str:
    """Map coordinates to print: 7 decimals in degrees (about 1 cm), else (metres, feet,
    pixel coordinates) 2, never exponents ("500128.00, 5299966.00", not "5.29966e+06")."""
    decimals = 2
    if crs:
        try:
            from rasterio.crs import CRS
            decimals = 7 if CRS.from_user_input(crs).is_geographic else 2
        except Exception:  # noqa: BLE001 - a CRS rasterio cannot parse prints as projected
            pass
    return ", ".join(f"{float(v):.{decimals}f}" for v in bounds)


def cancel_event() -> threading.Event:
    """The engine's cancel flag for a command-line run. Nothing sets it: Ctrl-C and
    SIGTERM arrive as KeyboardInterrupt, which stops the run where it is (main()
    prints "interrupted" and exits 130; outputs are written atomically, so none is
    left half-written)."""
    return threading.Event()


#: help text of a raster argument that may be remote
RASTER_HELP = ("raster file GDAL can read (GeoTIFF, VRT, JPEG2000, PNG, ...), or a remote one: "
               "http(s) URL, /vsicurl/, /vsis3/, /vsigs/ or /vsiaz/ path")


def raster_arg(text: str) -> str:
    """A raster argument checked before any work (raster/sources.py): a local file that
    exists, or a remote raster GDAL opens; URLs come back as /vsicurl/ paths."""
    from ..raster.sources import check_raster_source
    return check_raster_source(text)


def add_dense_input_args(p, mode_note: str = "") -> None:
    """--cls-token-lambda, --dense-input, --dense-slide (detect's dense mode, classify)."""
    p.add_argument("--cls-token-lambda", type=float, default=None, metavar="L", help=CLS_TOKEN_LAMBDA_HELP)
    p.add_argument("--dense-input", type=int, default=None, metavar="PX",
                   help=f"{mode_note}resize each tile to PX (a multiple of the model's patch; "
                        "position embeddings are interpolated); default the model's input size")
    p.add_argument("--dense-slide", action="store_true",
                   help=f"{mode_note}with a --dense-input larger than the model's: slide crops of "
                        "the model's size with half-crop stride and average them (SegEarth-OV)")


def add_read_workers_arg(p) -> None:
    """--read-workers (ReadOptions.workers), shared by the commands that read rasters."""
    p.add_argument("--read-workers", default="auto", metavar="N|auto",
                   help="reader processes: auto (one per core but one, for jobs of 1024 tiles "
                        "or more), 0 (read in threads of this process) or N; default auto")


def add_cache_arg(p) -> None:
    """--no-cache (the jobs' ``cache`` option), shared by the commands that embed a raster."""
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="neither reuse nor keep this raster's embeddings (by default a later "
                        "prompt on the same extent and model reuses them; see `cache info`)")


def read_workers(args):
    """--read-workers as ReadOptions.workers ("auto" or a whole number; checked by the engine)."""
    return parse_read_workers(args.read_workers)


def add_extent_args(p) -> None:
    """--extent and --extent-crs, shared by the commands that read part of a raster."""
    p.add_argument("--extent", default=None, metavar="XMIN,YMIN,XMAX,YMAX",
                   help="only this extent (default: the whole raster)")
    p.add_argument("--extent-crs", default=None, metavar="EPSG:N",
                   help="CRS of --extent (default: the raster's CRS)")


def parse_extent(args) -> Optional[Tuple[float, ...]]:
    """--extent as four numbers (None without it); --extent-crs alone is refused."""
    extent = parse_floats(args.extent, 4, "--extent", "--extent 500000,4000000,501000,4001000") \
        if args.extent else None
    if args.extent_crs and not extent:
        raise UsageError("--extent-crs given without --extent", "add --extent xmin,ymin,xmax,ymax")
    return extent


def parse_floats(text: str, n: int, what: str, example: str) -> Tuple[float, ...]:
    """N comma-separated numbers (an extent, a point), or a UsageError with an example."""
    try:
        vals = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise UsageError(f"{what} {text!r} is not {n} comma-separated numbers", f"e.g. {example}")
    return vals


def parse_bands(text: Optional[str]) -> Optional[List[int]]:
    """--bands "1,2,3" -> [1, 2, 3]; empty -> None (engine.core.options.parse_bands)."""
    return parse(text)
