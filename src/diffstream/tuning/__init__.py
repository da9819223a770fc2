"""Fine-tuning for the seed papers that call for it (`diffstream tune`).

- `loop`: the training loop every run shares (accelerate, checkpoints, resume, Ctrl-C).
- `equivariant`: Fairy's equivariant fine-tuning of an InstructPix2Pix model.
- `video`: a Tune-A-Video-style video UNet tuned one-shot on a clip, for FateZero's shape edits.
"""
