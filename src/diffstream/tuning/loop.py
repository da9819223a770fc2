"""The training loop every `diffstream tune` run shares.

    task = EquivariantTask(...)                      # or VideoTuneTask(...)
    result = tune(task, TuneConfig(output_dir="out/ip2p-equivariant", steps=1000))

The loop owns what does not depend on the model: accelerate (device, mixed precision),
the optimizer (AdamW, or bitsandbytes' 8-bit AdamW), gradient accumulation and clipping,
the progress bar with the loss, periodic validation, checkpoints, resume, the loss log
and curve, and Ctrl-C. The task (`TuneTask`) owns the model, the data, the loss and the
output format.

Reproducibility. The batch and the noise of step s come from one CPU generator seeded
from (seed, s), not from a stream that runs through the whole training: a run resumed
from a checkpoint at step s draws exactly what the uninterrupted run drew from step s on,
so with the optimizer state restored it continues the same trajectory (tested: resumed
weights == uninterrupted weights).

What is written (OUT = `TuneConfig.output_dir`):

    OUT/checkpoints/step-000100/   model/ (the task's loadable format), optimizer.pt, state.json
    OUT/final/                     the task's loadable format, after the last step
    OUT/validation/step-000000/    the task's validation outputs (step 0 = before tuning)
    OUT/log.jsonl                  one line per step: step, loss, lr, seconds
    OUT/metrics.json               validation metrics by step
    OUT/loss.png                   the loss curve (when matplotlib is installed)

Nothing already written is lost: a checkpoint is written under a temporary name and
renamed into place, so an interruption (Ctrl-C, SIGTERM, a crash) leaves either the
previous checkpoint or the new one, complete; old checkpoints are pruned only after
the new one is in place. Ctrl-C finishes the current step, writes a checkpoint of it and
exits with 130 (a second Ctrl-C stops at once; the last complete checkpoint stays).
Several processes (`accelerate launch`, one GPU each): each draws its own batches (the
generator of (seed, step x processes + rank)), the logged loss is their mean, and only
the main process validates and writes files. Not run here (one CPU, no GPUs).
An output folder that already holds a run is refused unless `resume` says to continue it.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from diffstream.errors import ConfigError, DiffstreamError, OutputError, one_line

MIXED_PRECISION = ("no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
DEVICES = ("auto", "cpu", "cuda", "mps")
STATE_FORMAT = "diffstream-tune-checkpoint"
STATE_VERSION = 1
CHECKPOINT_PREFIX = "step-"


class TuneInterrupted(DiffstreamError):
    """Ctrl-C / SIGTERM during tuning; the message names the checkpoint to resume from."""

    exit_code = 130


@dataclass(frozen=True)
class TuneConfig:
    """Settings of one tuning run that do not depend on what is tuned.

    Attributes:
        output_dir: folder of checkpoints, validation outputs, logs and the result.
        steps: optimisation steps in all (a resumed run continues up to this many).
        learning_rate: AdamW's learning rate (constant).
        batch_size: samples per micro-batch (passed to `TuneTask.sample_batch`).
        gradient_accumulation: micro-batches per optimisation step.
        seed: seeds every step's batch and noise (see the module docstring).
        checkpoint_every: steps between checkpoints (0: only at the end and on Ctrl-C).
        keep_checkpoints: how many of the newest checkpoints to keep (>= 1).
        validate_every: steps between validations (0: only before and after tuning).
        mixed_precision: "no", "fp16" (CUDA/MPS) or "bf16", through accelerate's autocast.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        optimizer: "adamw" or "adamw8bit" (bitsandbytes, CUDA).
        max_grad_norm: gradient clipping norm (0: none).
        weight_decay: AdamW's weight decay.
        resume: None (a new run), "latest" (the newest checkpoint in output_dir; a new run
            if there is none) or a checkpoint folder.
        device: "auto" (accelerate's choice: CUDA, MPS, else CPU), "cpu", "cuda" or "mps".
        progress: show a progress bar with the loss.
    """

    output_dir: str
    steps: int = 1000
    learning_rate: float = 1e-5
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    validate_every: int = 100
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    resume: str | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if not str(self.output_dir).strip():
            raise ConfigError("--output is required: the folder of the tuning run")
        if int(self.steps) < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if not (math.isfinite(float(self.learning_rate)) and float(self.learning_rate) > 0):
            raise ConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        for option, value in (("--batch-size", self.batch_size), ("--gradient-accumulation", self.gradient_accumulation),
                              ("--keep-checkpoints", self.keep_checkpoints)):
            if int(value) < 1:
                raise ConfigError(f"{option} must be at least 1, got {value}")
        for option, value in (("--checkpoint-every", self.checkpoint_every), ("--validate-every", self.validate_every)):
            if int(value) < 0:
                raise ConfigError(f"{option} must be >= 0 (0: only at the end), got {value}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if float(self.max_grad_norm) < 0 or float(self.weight_decay) < 0:
            raise ConfigError("--max-grad-norm and --weight-decay must be >= 0")


class TuneTask(Protocol):
    """What a tuning run trains (see the implementations in `diffstream.tuning`)."""

    name: str

    def module(self) -> torch.nn.Module:
        """The module holding every trainable parameter (requires_grad exactly on them)."""

    def sample_batch(self, step: int, generator: torch.Generator, batch_size: int) -> Any:
        """The batch of micro-step `step`, every random draw from `generator`."""

    def loss(self, module: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss of `batch`; noise and timesteps from `generator`."""

    def validate(self, module: torch.nn.Module, step: int, folder: Path) -> dict[str, float]:
        """Validation outputs into `folder`; returns metrics."""

    def save(self, module: torch.nn.Module, folder: Path) -> None:
        """The loadable result (diffusers folder or LoRA file) into the empty `folder`."""

    def load_trainable(self, module: torch.nn.Module, folder: Path) -> None:
        """Restore the trainable weights from a folder `save` wrote."""

    def usage(self, folder: Path) -> str:
        """One line: how to use the result in `folder`."""


@dataclass
class TuneResult:
    """The outcome of `tune`: steps done, the loss of every step, where the result is,
    and the validation metrics by step."""

    steps: int
    losses: list[float]
    final_dir: Path
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of optimisation step `step`: the same for every run of `seed`."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63 - 1))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{int(step):06d}"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints of a run (those with a state.json), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and (path / "state.json").is_file():
            try:
                found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's state.json, checked; one-line ConfigError when it is not one."""
    try:
        state = json.loads((Path(checkpoint) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {checkpoint}: not a tuning checkpoint ({one_line(exc, 120)}); "
                          f"pass a folder under OUT/checkpoints/ or --resume latest") from None
    if state.get("format") != STATE_FORMAT or not (Path(checkpoint) / "model").is_dir():
        raise ConfigError(f"--resume {checkpoint}: not a tuning checkpoint (no {STATE_FORMAT} state.json and "
                          f"model/ folder); pass a folder under OUT/checkpoints/ or --resume latest")
    return state


def resolve_resume(config: TuneConfig) -> Path | None:
    """The checkpoint to resume from, or None for a new run.

    Raises:
        ConfigError: a new run into a folder that holds one, or a resume folder that is
            not a checkpoint.
    """
    out = Path(config.output_dir)
    existing = list_checkpoints(out)
    if config.resume is None:
        if existing or (out / "final").exists():
            raise ConfigError(f"{out} already holds a tuning run ({(existing[-1] if existing else out / 'final')}); "
                              f"pass --resume latest to continue it, or another --output")
        return None
    if config.resume == "latest":
        return existing[-1] if existing else None
    path = Path(config.resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {config.resume}: no such checkpoint folder; pass --resume latest or a folder "
                          f"under {out / 'checkpoints'}")
    read_state(path)
    return path


def make_optimizer(params: list[torch.nn.Parameter], config: TuneConfig) -> torch.optim.Optimizer:
    """AdamW over `params`, or bitsandbytes' AdamW8bit (Tune-A-Video's choice on GPUs)."""
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes; CUDA); "
                              "use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_accelerator(config: TuneConfig):
    """accelerate's Accelerator for the device and precision asked for (checked first)."""
    from accelerate import Accelerator

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here; use --device auto or cpu")
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps: MPS is not available here; use --device auto or cpu")
    on_cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()
                                        and not torch.backends.mps.is_available())
    if config.mixed_precision == "fp16" and on_cpu:
        raise ConfigError("--mixed-precision fp16 needs a CUDA or MPS device; on the CPU use bf16 or no")
    return Accelerator(mixed_precision=config.mixed_precision, cpu=config.device == "cpu")


class _StopRequest:
    """First Ctrl-C: ask the loop to stop after the current step. Second: stop now."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class _Run:
    """The files of one run: checkpoints, logs, metrics and the loss curve. With several
    processes (`accelerate launch`), only the main one (`main`) writes files and validates."""

    def __init__(self, task: TuneTask, config: TuneConfig, main: bool = True):
        self.task, self.config, self.main = task, config, main
        self.out = Path(config.output_dir)
        self.losses: list[float] = []
        self.metrics: dict[int, dict[str, float]] = {}
        self.saved_step = -1

    def prepare_folder(self) -> None:
        if not self.main:
            return
        try:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.out / "validation").mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the tuning folder {self.out}: {one_line(exc, 120)}") from None

    def restore(self, checkpoint: Path, module, optimizer) -> int:
        state = read_state(checkpoint)
        if state.get("task") != self.task.name:
            raise ConfigError(f"--resume {checkpoint}: a checkpoint of `tune {state.get('task')}`, "
                              f"not `tune {self.task.name}`")
        self.task.load_trainable(module, checkpoint / "model")
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
        self.losses = [float(v) for v in state["losses"]]
        self.metrics = {int(k): v for k, v in state.get("metrics", {}).items()}
        self.saved_step = int(state["step"])
        self._rewrite_log()
        return self.saved_step

    def _rewrite_log(self) -> None:
        if not self.main:
            return
        with open(self.out / "log.jsonl", "w") as f:
            for i, value in enumerate(self.losses):
                f.write(json.dumps({"step": i + 1, "loss": value}) + "\n")

    def log(self, step: int, loss: float, lr: float, seconds: float) -> None:
        self.losses.append(loss)
        if not self.main:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "seconds": round(seconds, 4)}) + "\n")

    def validate(self, module, step: int) -> None:
        if not self.main:
            return
        folder = self.out / "validation" / checkpoint_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            values = self.task.validate(module, step, folder)
        module.train(was_training)
        self.metrics[step] = {k: float(v) for k, v in values.items()}
        _write_atomic(self.out / "metrics.json", json.dumps({str(k): v for k, v in sorted(self.metrics.items())},
                                                            indent=1))

    def checkpoint(self, module, optimizer, step: int) -> Path:
        """Write checkpoint `step` under a temporary name, rename it into place, prune."""
        root = self.out / "checkpoints"
        final = root / checkpoint_name(step)
        tmp = root / f".{final.name}.tmp"
        if not self.main:
            self.saved_step = step
            return final
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
        self.task.save(module, tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = dict(format=STATE_FORMAT, version=STATE_VERSION, task=self.task.name, step=step,
                     losses=self.losses, metrics={str(k): v for k, v in self.metrics.items()},
                     config=asdict(self.config))
        (tmp / "state.json").write_text(json.dumps(state))
        _replace_dir(tmp, final)
        self.saved_step = step  # only now: an interrupted write must be written again
        for old in list_checkpoints(self.out)[: -self.config.keep_checkpoints]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        self.plot()
        return final

    def finish(self, module) -> Path:
        final = self.out / "final"
        tmp = self.out / ".final.tmp"
        if not self.main:
            self.saved_step = step
            return final
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.task.save(module, tmp)
        _replace_dir(tmp, final)
        return final

    def plot(self) -> None:
        """OUT/loss.png: the loss of every step and its running mean (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        if not self.losses:
            return
        steps = list(range(1, len(self.losses) + 1))
        window = max(1, len(self.losses) // 20)
        running = torch.tensor(self.losses).cumsum(0)
        mean = [(running[i] - (running[i - window] if i >= window else 0)).item() / min(i + 1, window)
                for i in range(len(self.losses))]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, self.losses, lw=0.6, alpha=0.45, label="loss")
        ax.plot(steps, mean, lw=1.6, label=f"running mean ({window} steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"diffstream tune {self.task.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "loss.png")
        plt.close(fig)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`; an older `final` goes only afterwards."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def tune(task: TuneTask, config: TuneConfig) -> TuneResult:
    """Run (or resume) a tuning run of `task`; see the module docstring for what it writes.

    Raises:
        ConfigError: bad settings or resume folder, before any step runs.
        TuneInterrupted: Ctrl-C / SIGTERM; a checkpoint of the last finished step was written.
    """
    from tqdm.auto import tqdm

    checkpoint = resolve_resume(config)
    accelerator = make_accelerator(config)
    run = _Run(task, config, main=accelerator.is_main_process)
    run.prepare_folder()
    accelerator.wait_for_everyone()
    module = task.module()
    if config.gradient_checkpointing:
        if not hasattr(module, "enable_gradient_checkpointing"):
            raise ConfigError(f"--gradient-checkpointing: the {task.name} model does not support it")
        module.enable_gradient_checkpointing()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"tune {task.name}: the model has no trainable parameters")
    optimizer = make_optimizer(params, config)
    module, optimizer = accelerator.prepare(module, optimizer)
    bare = accelerator.unwrap_model(module)
    start = run.restore(checkpoint, bare, optimizer) if checkpoint is not None else 0
    if start == 0:
        run.validate(bare, 0)
    accelerator.wait_for_everyone()
    steps = int(config.steps)
    accumulation = int(config.gradient_accumulation)
    bar = tqdm(total=steps, initial=start, disable=not config.progress, desc=f"tune {task.name}", unit="step")
    step = start
    try:
        with _StopRequest() as stop:
            while step < steps:
                began = time.perf_counter()
                # each process its own batches (one process: the generator of `step`)
                generator = step_generator(config.seed, step * accelerator.num_processes + accelerator.process_index)
                module.train()
                total = 0.0
                for micro in range(accumulation):
                    batch = task.sample_batch(step * accumulation + micro, generator, config.batch_size)
                    with accelerator.autocast():
                        loss = task.loss(module, batch, generator)
                    # the mean over processes; one sync per micro-batch: training, not the frame loop
                    value = float(accelerator.reduce(loss.detach(), reduction="mean"))
                    if not math.isfinite(value):
                        raise ConfigError(f"tune {task.name}: the loss became {value} at step {step + 1}; "
                                          f"lower --learning-rate (checkpoints so far are kept)")
                    accelerator.backward(loss / accumulation)
                    total += value / accumulation
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                run.log(step, total, config.learning_rate, time.perf_counter() - began)
                bar.set_postfix(loss=f"{total:.4f}")
                bar.update()
                if step == steps:
                    break
                if config.validate_every and step % config.validate_every == 0:
                    run.validate(bare, step)
                    accelerator.wait_for_everyone()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    run.checkpoint(bare, optimizer, step)
                    accelerator.wait_for_everyone()
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if step != run.saved_step:  # else the checkpoint of this very step is already written
            path = run.checkpoint(bare, optimizer, step)
        else:
            path = run.out / "checkpoints" / checkpoint_name(run.saved_step)
        raise TuneInterrupted(f"interrupted at step {step}/{steps}; checkpoint {path} (usable as is); "
                              f"continue with --resume latest") from None
    bar.close()
    run.validate(bare, step)
    run.checkpoint(bare, optimizer, step)
    final = run.finish(bare)
    accelerator.wait_for_everyone()
    return TuneResult(steps=step, losses=list(run.losses), final_dir=final, metrics=dict(run.metrics))
