"""Fairy on a local Ray cluster: 2 workers give exactly the frames of 1 process (CPU fp32,
same chunk layout, same thread count), with either way of obtaining the anchors; a crashed
worker's segment is redone; a segment that keeps failing stops the run after every
earlier frame, in order."""

import dataclasses
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'diffstream[ray]')")

from diffstream.config import ModelConfig  # noqa: E402
from diffstream.models.loading import load_components  # noqa: E402
from diffstream.pipelines.distributed import (  # noqa: E402
    DistributedEdit,
    FairyWorker,
    RayConfig,
    SegmentError,
    WorkerPool,
)
from diffstream.commands.edit_fairy import edit_command  # noqa: E402
from diffstream.io.clip import Clip  # noqa: E402
from diffstream.pipelines.fairy import EditPlan, FairyConfig, FairyPipeline  # noqa: E402
from diffstream.testing import make_frames  # noqa: E402

MODEL = ModelConfig(model="tiny", device="cpu", instruct=True)
CONFIG = FairyConfig(instruction="Turn into a bronze statue", anchors=3, chunk_size=2, steps=2, size=64, seed=9,
                     sampler="euler-a", noise="per-frame")  # Fairy's ancestral sampler: fresh per-frame noise at every step
FRAMES = make_frames(14)


def faulty_worker(plan_file):
    """A worker class that follows a fault plan written to `plan_file` by a test: its
    process dies once on the segment starting at "crash_once", and it raises on the segment
    starting at "always_fail". No plan file: a plain FairyWorker. (A local class, so Ray
    ships it by value to the worker processes.)"""

    class FaultyWorker(FairyWorker):
        def edit_segment(self, start, stop, frames):
            if os.path.exists(plan_file):
                with open(plan_file) as f:
                    plan = json.load(f)
                if start == plan.get("always_fail"):
                    raise RuntimeError("this segment always fails")
                crashed = plan_file + ".crashed"
                if start == plan.get("crash_once") and not os.path.exists(crashed):
                    open(crashed, "w").close()
                    os._exit(1)  # the worker process dies mid-segment
            return super().edit_segment(start, stop, frames)

    return FaultyWorker


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    return str(tmp_path_factory.mktemp("faults") / "plan.json")


@pytest.fixture(scope="module")
def pool(faults):
    """A local Ray cluster with 2 workers that load the tiny model once for all tests (and
    a third CPU slot for the command-line test's own worker)."""
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False)
    config = RayConfig(workers=2, chunks_per_segment=1)
    with WorkerPool(MODEL, CONFIG, config, worker_cls=faulty_worker(faults)) as workers:
        yield workers
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """The single-process result (this process runs with 1 torch thread, like each worker)."""
    with FairyPipeline(load_components(MODEL), CONFIG) as pipe:
        return list(pipe.edit(FRAMES))


def job(pool, **changes):
    config = dataclasses.replace(pool.ray_config, **changes)
    return DistributedEdit(MODEL, CONFIG, Clip(FRAMES), config, pool=pool)


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def segment_starts():
    plan = EditPlan.build(len(FRAMES), CONFIG.anchors, CONFIG.chunk_size)
    return [start for start, _ in plan.segments(1)]


@pytest.mark.parametrize("transfer", ["recompute", "object_store"])
def test_two_workers_equal_one_process(pool, reference, transfer):
    edit = job(pool, anchor_transfer=transfer)
    edit.start()
    frames = list(edit)
    assert len(segment_starts()) == 6 and len(pool.actors) == 2
    assert same(frames, reference)
    assert edit.timings["anchor_compute_s"] > 0 and edit.retries == 0
    if transfer == "object_store":
        assert edit.timings["anchor_cache_bytes"] > 0


def test_dead_worker_is_replaced_and_a_failing_segment_stops_in_order(pool, reference, faults):
    starts = segment_starts()
    with open(faults, "w") as f:
        json.dump({"crash_once": starts[1], "always_fail": starts[4]}, f)
    try:
        edit = job(pool, max_retries=1)
        got = []
        with pytest.raises(SegmentError, match=f"frames {starts[4]}-") as err:
            for frame in edit:
                got.append(frame)
    finally:
        os.remove(faults)
    assert os.path.exists(faults + ".crashed") and edit.retries >= 2
    assert "\n" not in str(err.value)
    # Every frame before the failing segment, in order, including the redone one.
    assert len(got) == starts[4] and same(got, reference[: starts[4]])
    # The pool recovered: a new job on it still gives the single-process frames.
    again = job(pool)
    assert same(list(again), reference)


def test_workers_that_cannot_be_scheduled_are_a_clear_error(pool):
    from diffstream.pipelines.distributed import DistributedError

    config = RayConfig(workers=4, address="auto", start_timeout=2)  # 2 of 3 CPUs are taken
    with pytest.raises(DistributedError, match="did not start within 2 s") as err:
        DistributedEdit(MODEL, CONFIG, Clip(FRAMES), config).start()
    assert "\n" not in str(err.value) and len(pool.actors) == 2


def test_edit_command_on_a_running_cluster(pool, tmp_path):
    from diffstream.frames import load_image
    from diffstream.testing import write_video

    from diffstream.cli import build_parser

    def edit_parser():
        class P:
            def parse_args(self, argv):
                return build_parser().parse_args(["edit", "--method", "fairy", *argv])
        return P()

    video = write_video(tmp_path / "in.mp4", FRAMES, fps=10)
    out = tmp_path / "png/"
    args = edit_parser().parse_args([
        video, "-o", str(out) + "/", "--model", "tiny", "--device", "cpu", "--instruction", CONFIG.instruction,
        "--anchors", "3", "--chunk-size", "2", "--steps", "2", "--size", "64", "--seed", "9", "--noise", "per-frame",
        "--ray-address", "auto", "--workers", "1", "--anchor-transfer", "object-store", "--no-progress",
    ])
    assert edit_command(args) == 0
    assert ray.is_initialized() and len(pool.actors) == 2  # the joined cluster is left running
    written = [load_image(p) for p in sorted(out.iterdir())]
    with FairyPipeline(load_components(MODEL), CONFIG) as pipe:
        expected = list(pipe.edit(Clip(video)))  # the decoded video, edited in this process
    assert same(written, expected)
