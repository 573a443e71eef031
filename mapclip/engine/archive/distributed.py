"""Index builds on a Ray cluster: the same tiles, shards and manifest, more workers.

``build_index(..., IndexOptions(ray=ADDRESS))`` (``python -m engine index ...
--ray [ADDRESS]``) plans the same work as a build in one process, cuts it into
*chunks* of ``commit_tiles`` tile windows (one raster, one tile size, a range
of tile numbers), and hands the chunks to Ray actors. Each actor
(:class:`ChunkWorker`) loads the model once, reads its windows with the
engine's own reader (:func:`engine.raster.stream.iter_tile_batches`), embeds them
batch by batch with :func:`engine.archive.embed.embed_window_batch` (the function a
build in one process calls too), and writes its chunk as one shard of the
existing index format (``shards/NNNNNN.emb.npy`` and ``.tiles.npy``, written
beside their names and renamed). Only the driver writes the manifest: it
commits finished chunks in plan order, so the index's rows are in the order a
build in one process gives, each raster's progress stays "tiles done from the
start" and a shard enters the manifest only once it is complete on disk.

Faults: an actor that dies (a killed process, a lost node) is restarted by
Ray and its unfinished chunks run again (``ray_retries`` restarts per
actor); a chunk run twice rewrites the same shard files, so no tile is lost
or stored twice. If the driver itself stops, the committed chunks stay: the
same command again resumes after them (files of uncommitted chunks are
removed by the next writer, as after any interrupted build), with or without
Ray. Cancelling stops the workers and keeps what was committed.

The index folder and the rasters must be at the same path on every node (a
shared file system), and every node needs MapCLIP and its packages (docs/scale.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..core.errors import MapClipError, ModelError, UsageError
from ..core.faults import adopt as adopt_faults, fault_point, settings as fault_settings
from ..core.options import RAY_LOCAL
from ..model.identity import same_space
from ..model.space import model_identity
from .embed import embed_window_batch, read_options
from .format import SHARDS_DIR, TILE_DTYPE, save_npy, shard_file_check
from ..model.batching import BatchRunner
from ..model.models import load_model

#: Ray version the engine is tested with (requirements.txt)
RAY_PIN = "ray==2.60.0"
#: object store of a cluster this module starts on one machine: chunks travel
#: as a few KiB of tile windows and come back as shard facts, never as arrays
LOCAL_OBJECT_STORE_BYTES = 128 << 20
#: chunks queued per worker (one running, one waiting: no idle gap between chunks)
QUEUED_PER_WORKER = 2
#: chunks per worker handed out ahead of the commit point, at most: a slow chunk
#: (a worker restarting) holds the commits back, and what waits uncommitted is
#: what an interrupted driver loses
AHEAD_PER_WORKER = 4
#: seconds the driver waits for results between checks of the cancel flag
POLL_S = 0.25


@dataclass
class Chunk:
    """One unit of work: tiles ``first`` .. ``stop - 1`` of one raster at one tile size."""

    seq: int                    # position in the plan: the commit order
    raster_id: int
    path: str
    tile_px: int
    first: int
    stop: int
    shard_id: int               # the shard it writes (if any tile is kept)
    tiles: List[Any] = field(default_factory=list)   # engine.geo.tiling.Tile, first..stop-1


def plan_chunks(writer, plan, chunk_tiles: int) -> List[Chunk]:
    """The chunks of the build ``plan`` (``build_index``'s (source, entry, status)
    list) still to do, in the order a build in one process embeds them, each
    with its own shard id (reserved in the manifest)."""
    chunks: List[Chunk] = []
    next_shard = int(writer.manifest["next_shard"])
    for src, entry, status in plan:
        if status == "unchanged" or entry.get("complete"):
            continue
        for s, grid in src.grids.items():
            start = int(entry["progress"].get(str(s), 0))
            for a in range(start, len(grid), chunk_tiles):
                b = min(a + chunk_tiles, len(grid))
                chunks.append(Chunk(seq=len(chunks), raster_id=int(entry["id"]), path=str(src.path),
                                    tile_px=int(s), first=a, stop=b, shard_id=next_shard,
                                    tiles=list(grid.tiles[a:b])))
                next_shard += 1
    writer.manifest["next_shard"] = next_shard
    return chunks


class ChunkWorker:
    """Embeds chunks into shard files; a plain class, run by Ray as an actor.

    Loads the model once and checks that it embeds into the index's space (a
    node with another model file is refused, not mixed in).
    """

    def __init__(self, spec: str, device: Optional[str], precision: Optional[str],
                 read: Dict[str, Any], min_valid: float, batch_size: int, folder: str,
                 identity: Dict[str, Any], faults: Optional[Dict[str, str]] = None):
        adopt_faults(faults)       # the driver's fault variables (core/faults.py), tests only
        # an error here is kept and raised by run(): Ray reports an exception
        # of a constructor only as a dead actor, without the engine's message
        self.error: Optional[MapClipError] = None
        try:
            self.lm = load_model(spec, device=device, precision=precision)
            if not same_space(identity, model_identity(self.lm)):
                raise ModelError(f"a Ray worker loaded model {spec!r} with other weights than "
                                 "the driver's: its embeddings would not match the index",
                                 "give every node the same model files (the same path or preset)")
        except MapClipError as exc:
            self.error = exc
        self.read = read_options({"read": read})
        self.min_valid = float(min_valid)
        self.batch_size = int(batch_size)
        self.folder = Path(folder)

    def run(self, chunk: Chunk) -> Dict[str, Any]:
        """Embed one chunk and write its shard; returns what the driver commits."""
        if self.error is not None:
            raise self.error
        from ..raster.stream import iter_tile_batches
        from ..raster.reader import open_raster
        runner = BatchRunner(self.batch_size)
        embs, recs = [], []
        with open_raster(chunk.path, self.read) as reader:
            ri = reader.info
            batches = iter_tile_batches(reader, chunk.tiles, self.batch_size, min_valid=self.min_valid)
            try:
                for tiles, arr in batches:
                    fault_point("ray.batch")
                    e, r = embed_window_batch(self.lm, runner, chunk.raster_id, chunk.tile_px,
                                              tiles, arr, ri)
                    embs.append(e)
                    recs.append(r)
            finally:
                batches.close()
            skipped = batches.skipped
        rows = int(sum(len(r) for r in recs))
        out = {"seq": chunk.seq, "rows": rows, "skipped": int(skipped), "notes": list(runner.notes),
               "emb": None, "tiles": None}
        if rows:
            emb_rel = f"{SHARDS_DIR}/{chunk.shard_id:06d}.emb.npy"
            tiles_rel = f"{SHARDS_DIR}/{chunk.shard_id:06d}.tiles.npy"
            (self.folder / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
            save_npy(self.folder / emb_rel, np.ascontiguousarray(np.concatenate(embs), np.float16))
            save_npy(self.folder / tiles_rel, np.ascontiguousarray(np.concatenate(recs), TILE_DTYPE))
            out.update(emb=emb_rel, tiles=tiles_rel)
        return out


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("building on Ray needs the ray package, which is not installed",
                         f"pip install '{RAY_PIN}' (python3 build.py setup installs it), or "
                         "leave out --ray to build in this process", option="ray") from None
    return ray


#: seconds to wait for a cluster's head to accept a connection
CONNECT_TIMEOUT_S = 5.0


def check_reachable(address: str) -> None:
    """Refuse at once a HOST:PORT head that accepts no connection (ray.init
    would retry for minutes before it gives up)."""
    import socket
    if address in (RAY_LOCAL, "auto") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not HOST:PORT",
                         "give the head node's address, e.g. --ray 10.0.0.5:6379, or --ray auto "
                         "on a node of the cluster", option="ray")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(f"no Ray cluster answers at {address} ({exc.strerror or exc})",
                         "start it first (ray start --head --port 6379 on the head node) and "
                         "check the address and that the port is open", option="ray") from None


def connect(address: str) -> bool:
    """Join (or start) the Ray cluster; True when this call started Ray here."""
    ray = import_ray()
    check_reachable(address)
    if ray.is_initialized():
        return False
    kw: Dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    local = address == RAY_LOCAL
    if local and not os.environ.get("RAY_ADDRESS"):
        kw["object_store_memory"] = LOCAL_OBJECT_STORE_BYTES
    try:
        ray.init(address=None if local else address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = os.environ.get("RAY_ADDRESS") if local else address
        raise UsageError(f"cannot join the Ray cluster at {where or 'this machine'} ({exc})",
                         "start it first (ray start --head on the head node, ray start "
                         "--address HEAD:6379 on the others) and pass its address, e.g. "
                         "--ray auto or --ray HEAD:6379", option="ray") from None
    return True


def default_workers(options, resources: Dict[str, float]) -> tuple:
    """(workers, GPUs per worker): one worker per GPU of the cluster, else per CPU."""
    gpus = int(resources.get("GPU", 0))
    use_gpu = gpus >= 1 and str(options.device or "cuda").startswith("cuda")
    if options.ray_workers is not None:
        n = int(options.ray_workers)
    else:
        n = gpus if use_gpu else max(1, int(resources.get("CPU", 1)))
    return n, (1 if use_gpu else 0)


def _cause(exc: BaseException) -> Optional[BaseException]:
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, MapClipError) else None


def embed_plan_on_ray(writer, plan, lm, options, job, info) -> None:
    """Embed every unfinished tile of ``plan`` on Ray workers and commit the
    shards to ``writer``'s manifest in plan order (called by build_index
    under the index lock, with ``options.ray`` set)."""
    ray = import_ray()
    layout = writer.manifest["options"]
    chunks = plan_chunks(writer, plan, int(options.commit_tiles))
    writer.save()          # the reserved shard ids, before any worker writes
    entries = {int(e["id"]): e for _, e, st in plan}
    started = connect(options.ray) if chunks else False
    actors: List[Any] = []
    try:
        if chunks:
            _run(ray, writer, chunks, entries, lm, layout, options, job, info, actors)
        for _, entry, status in plan:
            if status != "unchanged":
                entry["complete"] = True
        writer.save()
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if started:
            ray.shutdown()


def _run(ray, writer, chunks: Sequence[Chunk], entries, lm, layout, options, job, info,
         actors: List[Any]) -> None:
    n, gpus = default_workers(options, ray.cluster_resources())
    n = max(1, min(n, len(chunks)))
    spec = str(lm.spec)
    p = Path(spec).expanduser()
    if p.exists():
        spec = str(p.resolve())
    identity = writer.manifest["model"] if writer.manifest.get("model") else model_identity(lm)
    retries = int(options.ray_retries)
    Worker = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=retries,
                        max_task_retries=retries)(ChunkWorker)
    device = options.device if options.device else (None if gpus else "cpu")
    for _ in range(n):
        actors.append(Worker.remote(spec, device, options.precision, layout["read"],
                                    layout["min_valid"], int(options.batch_size),
                                    str(writer.folder), identity, fault_settings()))
    todo = list(chunks)[::-1]               # pop() takes the next in plan order
    running: Dict[Any, int] = {}            # object ref -> actor number
    load = [0] * n
    done: Dict[int, Dict[str, Any]] = {}
    next_commit = 0
    window = n * AHEAD_PER_WORKER      # chunks handed out beyond the last commit, at most
    while next_commit < len(chunks):
        for i in range(n):
            while todo and load[i] < QUEUED_PER_WORKER and todo[-1].seq < next_commit + window:
                c = todo.pop()
                running[actors[i].run.remote(c)] = i
                load[i] += 1
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        job.check()
        for ref in ready:
            i = running.pop(ref)
            load[i] -= 1
            try:
                res = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = _cause(exc)
                raise (cause if cause is not None else MapClipError(
                    f"a Ray worker failed: {exc}",
                    "run the same command again: the build resumes after its last commit")) from None
            except ray.exceptions.RayActorError as exc:
                cause = _cause(exc)
                if cause is not None:
                    raise cause from None
                raise MapClipError(
                    f"a Ray worker died more than {retries} time(s) "
                    f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                    "the tiles committed so far are kept; run the same command again to "
                    "resume (look for out-of-memory kills in the node's logs)") from None
            done[int(res["seq"])] = res
        while next_commit in done:
            res = done.pop(next_commit)
            _commit(writer, chunks[next_commit], res, entries, job, info)
            next_commit += 1


def _commit(writer, chunk: Chunk, res: Dict[str, Any], entries, job, info) -> None:
    """Record a finished chunk in the manifest (its shard, the raster's progress)."""
    entry = entries[chunk.raster_id]
    if res["rows"]:
        writer.manifest["shards"].append({
            "id": chunk.shard_id, "raster": chunk.raster_id, "tile_px": chunk.tile_px,
            "rows": int(res["rows"]), "first_tile": chunk.first, "next_tile": chunk.stop,
            "emb": res["emb"], "tiles": res["tiles"],
            "check": shard_file_check(writer.folder, res["emb"], res["tiles"])})
    entry["progress"][str(chunk.tile_px)] = chunk.stop
    writer.save()
    info.embedded += int(res["rows"])
    info.skipped += int(res["skipped"])
    info.warnings.extend(n for n in res["notes"] if n not in info.warnings)
    job.step(chunk.stop - chunk.first)
