"""The shared tuning loop (`diffstream.tuning.loop`) on a task small enough to reason about:
a linear model fitted to y = x w* + noise. What is pinned: a resumed run continues the very
trajectory of an uninterrupted one (batches, noise and optimizer state), Ctrl-C leaves a
checkpoint that resumes, a failed checkpoint write loses nothing, a folder holding a run is
not overwritten, and the files a run promises are there."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from diffstream.errors import ConfigError
from diffstream.tuning.loop import TuneConfig, TuneInterrupted, list_checkpoints, tune

W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class LinearTask:
    """y = x w* + 0.01 n; the module is nn.Linear(4, 1). Saves weights as weights.pt."""

    name = "linear"

    def __init__(self, fail_save_at=None, interrupt_at=None):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.fail_save_at, self.interrupt_at = fail_save_at, interrupt_at
        self.saves = 0
        self.validated = []

    def module(self):
        return self.net

    def sample_batch(self, step, generator, batch_size):
        if self.interrupt_at is not None and step == self.interrupt_at:
            raise KeyboardInterrupt
        x = torch.randn(8 * batch_size, 4, generator=generator)
        return x, x @ W_TRUE

    def loss(self, module, batch, generator):
        x, y = batch
        noisy = y + 0.01 * torch.randn(y.shape, generator=generator)
        return torch.nn.functional.mse_loss(module(x), noisy)

    def validate(self, module, step, folder):
        self.validated.append(step)
        (folder / "note.txt").write_text(f"step {step}")
        return {"weight_error": float((module.weight.T - W_TRUE).abs().mean())}

    def save(self, module, folder):
        self.saves += 1
        if self.fail_save_at is not None and self.saves == self.fail_save_at:
            (folder / "weights.pt").write_bytes(b"half a file")
            raise OSError("disk full")
        torch.save(module.state_dict(), folder / "weights.pt")

    def load_trainable(self, module, folder):
        module.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))

    def usage(self, folder):
        return f"load {folder}/weights.pt"


def config(out, **kw):
    base = dict(output_dir=str(out), steps=6, learning_rate=0.05, checkpoint_every=3, validate_every=0,
                progress=False, device="cpu")
    base.update(kw)
    return TuneConfig(**base)


def weights(folder):
    return torch.load(Path(folder) / "weights.pt", weights_only=True)


def test_a_run_writes_what_it_promises_and_learns(tmp_path):
    task = LinearTask()
    result = tune(task, config(tmp_path, steps=40, checkpoint_every=10, validate_every=20, learning_rate=0.2))
    assert result.steps == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) < 0.2 * sum(result.losses[:5])  # it learns
    assert task.validated == [0, 20, 40]
    assert sorted(result.metrics) == [0, 20, 40]
    assert result.metrics[40]["weight_error"] < result.metrics[0]["weight_error"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 41))
    assert [e["loss"] for e in log] == pytest.approx(result.losses)
    assert json.loads((tmp_path / "metrics.json").read_text())["40"] == result.metrics[40]
    # keep_checkpoints=2: the two newest; the final checkpoint is the last step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000030", "step-000040"]
    torch.testing.assert_close(weights(result.final_dir), task.net.state_dict())
    assert (tmp_path / "validation" / "step-000020" / "note.txt").read_text() == "step 20"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert not list(tmp_path.rglob(".*tmp"))


def test_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole = tune(LinearTask(), config(tmp_path / "whole"))
    part = tune(LinearTask(), config(tmp_path / "part", steps=3))
    assert part.losses == whole.losses[:3]
    # a fresh process would build the task from scratch: a new LinearTask, other init weights
    torch.manual_seed(123)
    task = LinearTask()
    torch.nn.init.normal_(task.net.weight)
    resumed = tune(task, config(tmp_path / "part", resume="latest"))
    assert resumed.losses == whole.losses
    torch.testing.assert_close(weights(resumed.final_dir), weights(whole.final_dir), rtol=0, atol=0)


def test_interrupt_checkpoints_the_last_step_and_resumes(tmp_path):
    with pytest.raises(TuneInterrupted, match="interrupted at step 4/6.*step-000004.*--resume latest") as err:
        tune(LinearTask(interrupt_at=4), config(tmp_path / "run"))
    assert err.value.exit_code == 130
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003", "step-000004"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4
    # the interrupted checkpoint's model folder is the task's loadable format, as is
    torch.nn.Linear(4, 1).load_state_dict(weights(tmp_path / "run" / "checkpoints" / "step-000004" / "model"))
    whole = tune(LinearTask(), config(tmp_path / "whole"))
    resumed = tune(LinearTask(), config(tmp_path / "run", resume="latest"))
    assert resumed.losses == whole.losses
    torch.testing.assert_close(weights(resumed.final_dir), weights(whole.final_dir), rtol=0, atol=0)


def test_a_failed_checkpoint_write_loses_nothing(tmp_path):
    # saves: 1 = checkpoint 3, 2 = checkpoint 6 (fails half-way)
    with pytest.raises(OSError, match="disk full"):
        tune(LinearTask(fail_save_at=2), config(tmp_path, steps=9))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003"]
    assert not (tmp_path / "checkpoints" / "step-000006").exists()
    weights(tmp_path / "checkpoints" / "step-000003" / "model")  # intact
    resumed = tune(LinearTask(), config(tmp_path, steps=9, resume="latest"))
    assert resumed.steps == 9 and len(resumed.losses) == 9


def test_a_folder_holding_a_run_is_not_overwritten(tmp_path):
    tune(LinearTask(), config(tmp_path, steps=3))
    before = (tmp_path / "final" / "weights.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a tuning run.*--resume latest"):
        tune(LinearTask(), config(tmp_path, steps=3))
    assert (tmp_path / "final" / "weights.pt").read_bytes() == before
    with pytest.raises(ConfigError, match="--resume .*not a tuning checkpoint|no such checkpoint"):
        tune(LinearTask(), config(tmp_path, resume=str(tmp_path / "final")))


class NanTask(LinearTask):
    def loss(self, module, batch, generator):
        return super().loss(module, batch, generator) * float("nan")


def test_a_diverging_loss_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="loss became nan at step 1; lower --learning-rate"):
        tune(NanTask(), config(tmp_path))


@pytest.mark.parametrize("kw, message", [
    (dict(steps=0), "--steps must be at least 1"),
    (dict(learning_rate=0.0), "--learning-rate must be positive"),
    (dict(mixed_precision="fp8"), "--mixed-precision must be one of"),
    (dict(optimizer="sgd"), "--optimizer must be one of"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0"),
])
def test_bad_settings_are_one_line(tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, **kw)


def test_fp16_on_the_cpu_and_missing_bitsandbytes_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA or MPS device"):
        tune(LinearTask(), config(tmp_path / "a", mixed_precision="fp16"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="adamw8bit needs bitsandbytes"):
            tune(LinearTask(), config(tmp_path / "b", optimizer="adamw8bit"))


SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_loop import LinearTask, config
    from diffstream.tuning.loop import tune, TuneInterrupted

    class Slow(LinearTask):
        def loss(self, module, batch, generator):
            time.sleep(0.05)
            return super().loss(module, batch, generator)

    try:
        tune(Slow(), config({out!r}, steps=100000, checkpoint_every=5))
    except TuneInterrupted as err:
        print(err, flush=True)
        sys.exit(err.exit_code)
""")


def test_sigint_in_a_real_process_leaves_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "run"
    script = SCRIPT.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not list_checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list_checkpoints(out), proc.communicate()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stdout and "--resume latest" in stdout
    last = list_checkpoints(out)[-1]
    step = json.loads((last / "state.json").read_text())["step"]
    assert stdout.startswith(f"interrupted at step {step}/")
    resumed = tune(LinearTask(), config(out, steps=step + 2, resume="latest"))
    assert resumed.steps == step + 2 and len(resumed.losses) == step + 2
