"""Fairy across processes, GPUs and machines with Ray (Fairy's "parallelized" part, Sec. 4).

Once the anchors are cached, every ordinary frame depends only on its own input, its
own noise and the cache (`diffstream.attention.anchor`), so a clip splits into
independent segments. The driver (this process) decodes the clip once, in order, cuts it
into segments that start at chunk boundaries (`EditPlan.segments`), sends each to a
worker actor through Ray's object store, and yields the results strictly in frame order
as they come back. Each worker loads the model once and obtains the anchor cache in one
of two ways (`RayConfig.anchor_transfer`):

- "recompute" (default): the worker generates the K anchors itself from the same anchor
  frames, in the same batch, so on identical hardware its cache is bit-identical to
  the single-process one. It costs K frames' worth of denoising per worker.
- "object_store": worker 0 generates the anchors and every other worker receives the
  cache. The cache holds keys and values of every self-attention layer for every step
  and guidance branch: for SD 1.5 at 512x512, 10 steps, 3 branches and K = 3 it is about
  4 GB in fp16, far more to ship than K frames cost to recompute, so recompute is the
  default; the benchmark measures both on the tiny model.

At most `2 x workers` segments are outstanding (submitted and not yet written), so the
driver's memory is bounded whatever the clip length. A segment whose worker dies is
resubmitted to a fresh worker (up to `max_retries` times); the writer never skips ahead,
so nothing is written out of order or twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np

from diffstream import frames as F
from diffstream.errors import ConfigError, DiffstreamError, one_line

TRANSFERS = ("recompute", "object_store")
RAY_EXTRA_HINT = "pip install 'diffstream[ray]'"


class DistributedError(DiffstreamError):
    """The Ray workers could not do the job (the message says what and what to do)."""

    exit_code = 1


class SegmentError(DistributedError):
    """A segment failed on every retry; frames before it have been written."""


@dataclass(frozen=True)
class RayConfig:
    """How an edit is split across Ray workers.

    Attributes:
        workers: worker processes (one model each). None or 1 without `address` means no
            Ray at all; with `address`, None means one worker per GPU of the cluster (or
            per `cpus_per_worker` CPUs when it has none).
        address: a Ray cluster to join ("auto", "ray://head:10001", ...); None starts a
            private local cluster for the run.
        anchor_transfer: "recompute" or "object_store" (see the module doc).
        chunks_per_segment: chunks per unit of work sent to a worker: larger segments
            amortise the transfer, smaller ones balance load and lose less on a failure.
        max_retries: resubmissions of one segment after its worker failed.
        start_timeout: seconds to wait for the workers to be scheduled and load the model.
        cpus_per_worker: CPUs (and torch threads) each worker reserves.
        gpus_per_worker: GPUs each worker reserves; None: 1 when the cluster has GPUs
            and the model's device is auto/cuda, else 0.
    """

    workers: int | None = None
    address: str | None = None
    anchor_transfer: str = "recompute"
    chunks_per_segment: int = 4
    max_retries: int = 2
    start_timeout: float = 600.0
    cpus_per_worker: int = 1
    gpus_per_worker: float | None = None

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.anchor_transfer not in TRANSFERS:
            raise ConfigError(
                f"--anchor-transfer must be one of {', '.join(t.replace('_', '-') for t in TRANSFERS)}, "
                f"got {self.anchor_transfer!r}"
            )
        if self.chunks_per_segment < 1:
            raise ConfigError(f"chunks_per_segment must be >= 1, got {self.chunks_per_segment}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.cpus_per_worker < 1:
            raise ConfigError(f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}")

    @property
    def enabled(self) -> bool:
        """Whether the edit runs on Ray workers at all."""
        return self.address is not None or (self.workers or 1) > 1

    def check_available(self) -> None:
        """ConfigError naming the extra when Ray is needed but not installed."""
        if not self.enabled:
            return
        try:
            import ray  # noqa: F401
        except ImportError:
            option = "--ray-address" if self.address is not None else f"--workers {self.workers}"
            raise ConfigError(f"{option} needs Ray, which is not installed: {RAY_EXTRA_HINT}") from None


class FairyWorker:
    """One Ray actor: loads the model once, holds the anchor cache, edits segments.

    Args:
        model_config: the ModelConfig to load (each worker loads its own copy).
        config: the resolved FairyConfig.
        lcm: the checkpoint fuses an LCM-LoRA (sampler choice).
        threads: torch threads of this worker (= the CPUs it reserved).
    """

    def __init__(self, model_config, config, lcm: bool = False, threads: int = 1):
        import torch

        torch.set_num_threads(int(threads))
        self.model_config, self.config, self.lcm = model_config, config, lcm
        self.pipe = None

    def load(self) -> bool:
        """Load the model and build the pipeline (once per worker)."""
        from diffstream.models.loading import load_components
        from diffstream.pipelines.fairy import FairyPipeline

        if self.pipe is None:
            self.pipe = FairyPipeline(load_components(self.model_config), self.config, lcm=self.lcm)
        return True

    def begin(self, num_frames: int, width: int, height: int, size=None) -> tuple[int, int]:
        """Plan a new clip (forgets the previous anchors); returns the processing size."""
        self.load()
        self.pipe.begin(num_frames, width, height, size=size)
        return self.pipe.size

    def make_anchors(self, frames) -> float:
        """Generate the anchors here (recompute); returns the seconds it took."""
        start = time.perf_counter()
        self.pipe.make_anchors(frames)
        return time.perf_counter() - start

    def export_anchors(self):
        """(cache, anchor outputs) for the object store."""
        return self.pipe.export_anchors()

    def load_anchors(self, pack) -> int:
        """Install anchors made by another worker; returns the cache size in bytes."""
        cache, outputs = pack
        self.pipe.load_anchors(cache, outputs)
        return self.pipe.state.nbytes

    def edit_segment(self, start: int, stop: int, frames) -> list[np.ndarray]:
        """Edit frames start..stop-1 (given at the processing size); returns them in order."""
        return list(self.pipe.edit_range(frames, start, stop))


class WorkerPool:
    """Ray actors with the model loaded, reusable for any number of clips.

        with WorkerPool(model_config, fairy_config, RayConfig(workers=2)) as pool:
            for clip in clips:
                job = DistributedEdit(model_config, fairy_config, clip, pool.ray_config, pool=pool)
                ...

    Args:
        model_config, config: what every worker loads and how it edits.
        ray_config: cluster, worker count and resources.
        worker_cls: the actor class (tests substitute a subclass that fails on purpose).
    """

    def __init__(self, model_config, config, ray_config: "RayConfig", worker_cls=None):
        from diffstream.config import uses_lcm

        ray_config.check_available()
        self.model_config, self.config, self.ray_config = model_config, config, ray_config
        self.lcm = uses_lcm(model_config)
        self.worker_cls = worker_cls or FairyWorker
        self.actors: list = []
        self.started = False
        self._started_ray = False
        self._closed = False

    def start(self) -> "WorkerPool":
        """Join or start the cluster, start the workers and load the model in each (in parallel)."""
        if self.started:
            return self
        import ray

        rc = self.ray_config
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if rc.address is not None:
                ray.init(address=rc.address, **kwargs)
            else:
                ray.init(num_cpus=(rc.workers or 1) * rc.cpus_per_worker, **kwargs)
            self._started_ray = True
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        workers = rc.workers
        if workers is None:
            workers = int(gpus) if gpus >= 1 else max(1, int(resources.get("CPU", 1)) // rc.cpus_per_worker)
        per_gpu = rc.gpus_per_worker
        if per_gpu is None:
            device = self.model_config.device
            per_gpu = 1 if gpus >= 1 and (device == "auto" or device.startswith("cuda")) else 0
        self._remote = ray.remote(self.worker_cls).options(
            num_cpus=rc.cpus_per_worker, num_gpus=per_gpu, max_restarts=0
        )
        self.actors = [self._new_actor() for _ in range(workers)]
        self.started = True
        try:
            _get([a.load.remote() for a in self.actors], timeout=rc.start_timeout)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            self.close()  # pending actors would take the resources whenever they free up
            raise DistributedError(
                f"{workers} Ray workers ({rc.cpus_per_worker} CPU, {per_gpu} GPU each) did not start within "
                f"{rc.start_timeout:.0f} s; the cluster has {free.get('CPU', 0):g} CPUs and {free.get('GPU', 0):g} "
                f"GPUs free: use fewer --workers or free the cluster"
            ) from None
        except BaseException:  # a worker could not load the model (or Ctrl-C): stop them all
            self.close()
            raise
        return self

    def _new_actor(self):
        return self._remote.remote(self.model_config, self.config, self.lcm, self.ray_config.cpus_per_worker)

    def replace(self, actor):
        """Kill `actor` (a dead or failing worker) and put a fresh one (loading its model) in its slot.

        Returns the actor now in that slot (already replaced ones are left alone)."""
        import ray

        if actor not in self.actors:
            return None
        slot = self.actors.index(actor)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
        fresh = self._new_actor()
        fresh.load.remote()  # queued: runs before anything submitted to it later
        self.actors[slot] = fresh
        return fresh

    def close(self) -> None:
        """Stop the workers (and the local Ray cluster if this pool started it); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray
        except ImportError:
            return
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


@dataclass
class _Task:
    start: int
    stop: int
    frames_ref: object
    tries: int = 0


class DistributedEdit:
    """One clip edited by Ray workers.

        job = DistributedEdit(model_config, fairy_config, clip, RayConfig(workers=2))
        size = job.start()            # workers loaded, anchors ready
        for frame in job: ...         # every frame, in order
        job.close()                   # also done when iteration ends

    Args:
        model_config: what each worker loads.
        config: the FairyConfig (resolved with the model's LCM/turbo facts).
        clip: a `Clip` or list of frames (decoded here, once per pass).
        ray_config: the split.
        pool: running workers to use (kept open afterwards); None starts a pool for
            this clip and closes it at the end.
        worker_cls: the actor class of a pool started here.
    Attributes:
        timings: seconds spent starting workers and obtaining the anchors; cache bytes.
        retries: segments resubmitted after a failure.
    """

    def __init__(self, model_config, config, clip, ray_config: RayConfig, pool: WorkerPool | None = None,
                 worker_cls=None):
        from diffstream.io.clip import as_clip

        ray_config.check_available()
        self.model_config, self.config, self.ray_config = model_config, config, ray_config
        self.clip = as_clip(clip)
        self._own_pool = pool is None
        self.pool = pool or WorkerPool(model_config, config, ray_config, worker_cls=worker_cls)
        self.timings: dict[str, float] = {}
        self.retries = 0
        self._closed = False
        self.size = None
        self.plan = None

    # --- setup ---------------------------------------------------------------------
    def _begin(self, actor):
        return actor.begin.remote(self.plan.num_frames, self.clip.width, self.clip.height, self.size)

    def _prepare_fresh(self, actor) -> None:
        """Queue plan and anchors on a replacement actor (its calls run in order)."""
        self._begin(actor)
        if self._anchor_pack is not None:
            actor.load_anchors.remote(self._anchor_pack)
        else:
            actor.make_anchors.remote(self._anchor_frames_ref)

    def start(self) -> tuple[int, int]:
        """Start the workers (unless the pool runs), plan the clip and prepare the anchors.

        Returns:
            the processing size (width, height) of the output frames.
        """
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> tuple[int, int]:
        import ray

        from diffstream.pipelines.fairy import EditPlan

        t0 = time.perf_counter()
        self.pool.start()
        self.timings["workers_s"] = time.perf_counter() - t0
        num_frames = len(self.clip)
        self.plan = EditPlan.build(num_frames, self.config.anchors, self.config.chunk_size)
        actors = self.pool.actors
        sizes = _get([a.begin.remote(num_frames, self.clip.width, self.clip.height) for a in actors])
        self.size = tuple(sizes[0])

        t1 = time.perf_counter()
        anchor_frames = [F.resize(F.to_rgb(f), self.size) for f in self.clip.read(self.plan.anchors)]
        self._anchor_frames_ref = ray.put(anchor_frames)
        self._anchor_pack = None
        if self.ray_config.anchor_transfer == "object_store":
            self.timings["anchor_compute_s"] = _get(actors[0].make_anchors.remote(self._anchor_frames_ref))
            t2 = time.perf_counter()
            self._anchor_pack = actors[0].export_anchors.remote()  # owned here: lives as long as this job
            sizes = _get([a.load_anchors.remote(self._anchor_pack) for a in actors[1:]])
            self.timings["anchor_transfer_s"] = time.perf_counter() - t2
            self.timings["anchor_cache_bytes"] = float(sizes[0]) if sizes else 0.0
        else:
            seconds = _get([a.make_anchors.remote(self._anchor_frames_ref) for a in actors])
            self.timings["anchor_compute_s"] = max(seconds)
        self.timings["anchors_s"] = time.perf_counter() - t1
        return self.size

    # --- the ordered, retried segment loop --------------------------------------------
    def __iter__(self) -> Iterator[np.ndarray]:
        """Every output frame in order; closes the job when done or abandoned."""
        import ray

        if self.plan is None:
            self.start()
        try:
            frames = iter(self.clip)
            segments = self.plan.segments(self.ray_config.chunks_per_segment)
            actors = self.pool.actors
            tasks: dict[int, _Task] = {}
            results: dict[int, list] = {}
            failed: dict[int, SegmentError] = {}  # given up on; raised once its turn to be written comes
            inflight: dict = {}  # ObjectRef -> (segment id, slot, actor)
            load = [0] * len(actors)
            submitted = written = 0
            exhausted = False
            limit = 2 * len(actors)

            def submit(seg_id: int) -> None:
                slot = min(range(len(actors)), key=lambda s: load[s])
                task = tasks[seg_id]
                ref = actors[slot].edit_segment.remote(task.start, task.stop, task.frames_ref)
                inflight[ref] = (seg_id, slot, actors[slot])
                load[slot] += 1

            while True:
                while not exhausted and submitted - written < limit:
                    segment = next(segments, None)
                    if segment is None:
                        exhausted = True
                        break
                    start, stop = segment
                    batch = [F.resize(F.to_rgb(f), self.size) for f in islice(frames, stop - start)]
                    if not batch:
                        exhausted = True
                        break
                    tasks[submitted] = _Task(start, start + len(batch), ray.put(batch))
                    submit(submitted)
                    submitted += 1
                if written in results:
                    for frame in results.pop(written):
                        yield frame
                    del tasks[written]
                    written += 1
                    continue
                if written in failed:  # every earlier frame is out: now report the failure
                    raise failed[written]
                if exhausted and written >= submitted:
                    return
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    seg_id, slot, actor = inflight.pop(ref)
                    load[slot] -= 1
                    try:
                        results[seg_id] = ray.get(ref)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        if isinstance(err.cause, DiffstreamError):
                            raise err.cause from None
                        failure, dead = err, False
                    except ray.exceptions.RayError as err:  # the worker process died
                        failure, dead = err, True
                    if dead:
                        fresh = self.pool.replace(actor)
                        if fresh is not None:
                            self._prepare_fresh(fresh)
                    error = self._count_retry(tasks[seg_id], failure)
                    if error is None:
                        submit(seg_id)
                    else:
                        failed[seg_id] = error
                        exhausted = True  # nothing after a lost segment can be written: submit no more
        finally:
            self.close()

    def _count_retry(self, task: _Task, err) -> SegmentError | None:
        """Count a failure of `task`; the error to report once retries are used up, else None."""
        task.tries += 1
        if task.tries > self.ray_config.max_retries:
            reason = one_line(getattr(err, "cause", None) or err, 200)
            return SegmentError(
                f"frames {task.start}-{task.stop - 1} failed {task.tries} times on Ray workers ({reason}); "
                f"the {task.start} frames before them were written"
            )
        self.retries += 1
        return None

    def close(self) -> None:
        """Release the anchors; stop the workers if this job started them. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._anchor_pack = self._anchor_frames_ref = None
        if self._own_pool:
            self.pool.close()


def _get(refs, timeout=None):
    """ray.get that turns a worker's DiffstreamError back into itself (one-line message)."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, DiffstreamError):
            raise err.cause from None
        raise
