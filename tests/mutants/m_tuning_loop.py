"""Mutants of the shared tuning loop (issue #15). Proofs: tests/tuning/test_loop.py."""

from mutation import Patch, mutant

LOOP = "diffstream.tuning.loop"
RUN = f"{LOOP}:_Run"
T = "tests/tuning/test_loop.py"

MUTANTS = [
    mutant("tune-resume-forgets-optimizer", "a resumed run starts AdamW's moments afresh",
           [f"{T}::test_resumed_run_equals_the_uninterrupted_one",
            f"{T}::test_interrupt_checkpoints_the_last_step_and_resumes"],
           Patch(f"{RUN}.restore", "optimizer.load_state_dict(", "(lambda state: None)(")),
    mutant("tune-generator-one-stream", "every step draws from one generator seeded at the start, so a resumed "
           "run sees other batches than the uninterrupted one",
           [f"{T}::test_resumed_run_equals_the_uninterrupted_one"],
           Patch(f"{LOOP}:tune",
                 "generator = step_generator(config.seed, step * accelerator.num_processes + accelerator.process_index)",
                 "generator = generator if step > start else step_generator(config.seed, step)")),
    mutant("tune-resume-keeps-init-weights", "resume restores the optimizer but not the tuned weights",
           [f"{T}::test_resumed_run_equals_the_uninterrupted_one"],
           Patch(f"{RUN}.restore", "self.task.load_trainable(module, checkpoint / \"model\")", "pass")),
    mutant("tune-checkpoint-in-place", "a checkpoint is written straight into its final folder (a failed write "
           "leaves a half checkpoint that resume picks up)",
           [f"{T}::test_a_failed_checkpoint_write_loses_nothing"],
           Patch(f"{RUN}.checkpoint", "tmp = root / f\".{final.name}.tmp\"", "tmp = final")),
    mutant("tune-interrupt-without-checkpoint", "Ctrl-C exits without checkpointing the step it stopped at",
           [f"{T}::test_interrupt_checkpoints_the_last_step_and_resumes"],
           Patch(f"{LOOP}:tune", "if step != run.saved_step:", "if False:")),
    mutant("tune-overwrites-a-run", "a new run into a folder holding one starts over it",
           [f"{T}::test_a_folder_holding_a_run_is_not_overwritten"],
           Patch(f"{LOOP}:resolve_resume", "if existing or (out / \"final\").exists():", "if False:")),
    mutant("tune-prunes-newest", "pruning keeps the oldest checkpoints instead of the newest",
           [f"{T}::test_a_run_writes_what_it_promises_and_learns"],
           Patch(f"{RUN}.checkpoint", "list_checkpoints(self.out)[: -self.config.keep_checkpoints]",
                 "list_checkpoints(self.out)[self.config.keep_checkpoints:]")),
]
