"""Mutants of the Wan loader and memory check wired into the product (issue #18): the text
encoder offload (where the encoder lives, the per-prompt cache), `--transformer`, and the
GPU-memory refusal's place (before the model loads). Their proofs are in
tests/models/test_wan_loading_wiring.py."""

from mutation import Patch, mutant

PROOFS = "tests/models/test_wan_loading_wiring.py"

MUTANTS = [
    mutant("wanw-offload-encoder-on-device", "--text-encoder-offload still puts the text encoder on the device "
           "(the 11 GB the option exists to keep off the GPU)",
           [f"{PROOFS}::test_offload_keeps_the_encoder_on_the_cpu_and_embeddings_go_to_the_device"],
           Patch("diffstream.models.loading:load_wan_components",
                 'where = torch.device("cpu") if key == "text_encoder" and config.text_encoder_offload else device',
                 "where = device")),
    mutant("wanw-offload-no-cache", "with the encoder offloaded, every prompt is encoded again on every call (the "
           "per-prompt cache not used: seconds of CPU work per prompt switch)",
           [f"{PROOFS}::test_offload_equals_resident_and_encodes_each_prompt_once"],
           Patch("diffstream.models.wan:WanComponents.encode_text",
                 "missing = list(dict.fromkeys(p for p in prompts if p not in cache))",
                 "missing = list(dict.fromkeys(prompts))")),
    mutant("wanw-offload-embeddings-stay-on-cpu", "offloaded embeddings left on the encoder's device instead of "
           "the transformer's",
           [f"{PROOFS}::test_offload_keeps_the_encoder_on_the_cpu_and_embeddings_go_to_the_device"],
           Patch("diffstream.models.wan:WanComponents._encode",
                 "return (hidden * mask[..., None].to(hidden.dtype)).to(device=self.device, dtype=self.dtype)",
                 "return (hidden * mask[..., None].to(hidden.dtype)).to(dtype=self.dtype)")),
    mutant("wanw-transformer-ignored", "--transformer accepted but the model's own transformer kept",
           [f"{PROOFS}::test_transformer_replaces_tiny_wan_and_a_folder_transformer"],
           Patch("diffstream.models.loading:load_wan_components",
                 'modules["transformer"] = load_wan_transformer(Path(config.transformer).expanduser(), dtype=dtype)',
                 'load_wan_transformer(Path(config.transformer).expanduser(), dtype=dtype)')),
    mutant("wanw-refusal-after-loading", "the GPU-memory check made after the model has loaded (a card too small "
           "fails in an out-of-memory error mid-load instead of one line before it)",
           [f"{PROOFS}::test_a_gpu_too_small_is_refused_before_loading"],
           Patch("diffstream.commands.run:cmd_run",
                 "        if common.check_memory(config.model, *_work_size(config, source), "
                 "config.stream.video.block_causal,\n"
                 "                               rows=config.stream.video_cache_rows, **(memory or {})):\n"
                 "            return 0  # --vram-estimate: printed, nothing loaded\n"
                 "        if io.progress:\n"
                 "            common.say(common.loading_message(config.model))\n"
                 "        components = load_components(config.model)",
                 "        if io.progress:\n"
                 "            common.say(common.loading_message(config.model))\n"
                 "        components = load_components(config.model)\n"
                 "        if common.check_memory(config.model, *_work_size(config, source), "
                 "config.stream.video.block_causal,\n"
                 "                               rows=config.stream.video_cache_rows, **(memory or {})):\n"
                 "            return 0")),
    mutant("wanw-serve-refusal-after-loading", "serve's GPU-memory check made after the model has loaded",
           [f"{PROOFS}::test_serve_refuses_before_loading_and_names_max_clients"],
           Patch("diffstream.commands.serve:command",
                 "        if check_memory(args, config, base_config):\n"
                 "            return 0  # --vram-estimate: printed, nothing loaded\n"
                 "        common.say(common.loading_message(config))\n"
                 "        components = load_components(config)",
                 "        common.say(common.loading_message(config))\n"
                 "        components = load_components(config)\n"
                 "        if check_memory(args, config, base_config):\n"
                 "            return 0")),
    mutant("wanw-estimate-square", "the run's estimate made for a square --size frame, the input's aspect ignored",
           [f"{PROOFS}::test_a_gpu_too_small_is_refused_before_loading"],
           Patch("diffstream.commands.run:_work_size",
                 "return F.fit_size(source.width, source.height, config.stream.size, 16)",
                 "return F.fit_size(config.stream.size, config.stream.size, config.stream.size, 16)")),
    mutant("wanw-estimate-ignores-offload", "the estimate counts the text encoder on the GPU with "
           "--text-encoder-offload", [f"{PROOFS}::test_a_gpu_that_fits_goes_on_to_load"],
           Patch("diffstream.commands.common:check_memory",
                 "text_encoder_offload=resolved.text_encoder_offload, rows=rows,",
                 "text_encoder_offload=False, rows=rows,")),
    mutant("wanw-serve-one-cache-per-stream", "serve's estimate counts one KV cache per client with the stream "
           "batch's cache per step", [f"{PROOFS}::test_serve_takes_the_causal_video_options_and_counts_a_cache_per_step"],
           Patch("diffstream.commands.serve:check_memory", "rows = stream.video_cache_rows", "rows = 1")),
]
