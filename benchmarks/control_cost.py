"""Per-frame cost of ControlNets in the stream, as a ratio to the plain stream (issue #17).

Full-size architectures with random weights (they time exactly like trained ones): the
SD 1.5 UNet and CLIP text encoder, a TAESD-size tiny VAE, SD 1.5-size ControlNets
(`ControlNetModel.from_unet`) and, for the depth preprocessor, a DPT depth model with a
ViT-B/16 backbone at 384 x 384 (the size of DPT-Hybrid's ViT, the default estimator, without
its ResNet stem). 256 px,
2 denoising steps, stream batch, RCFG self, fp32 eager on the CPU (on CUDA when present).

Configurations, each a stream of its own, timed frame by frame in turn (interleaved) and
summarised by medians: plain, canny (preprocessor + one ControlNet), depth (estimator +
one ControlNet), canny+depth, canny at scale 0 (switched off live: the preprocessor
still runs, the ControlNet does not), and an SD 1.5-size IP-Adapter with an image prompt
(per frame: its extra cross-attention keys/values; the image is encoded once).

    python benchmarks/control_cost.py --json [--frames 4] [--size 256] [--steps 2] [--arch sd15|sdxl]

With --arch sdxl: SDXL base's UNet and SDXL-size ControlNets (`from_unet`), no IP-Adapter row.

The last line (with --json) is one JSON object: seconds_per_frame and ratio_to_plain per
configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from diffstream.models.tiny import sd15_random_components
from diffstream.testing import benchmark_clip


def sdxl_random_components():
    """(Benchmarks) SDXL base's UNet configuration with random weights, a TAESD-size tiny VAE
    and one-layer text encoders of SDXL's output widths (768 + 1280 hidden, 1280 pooled): the
    text encoders run once per prompt, so their depth does not change the per-frame cost."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffstream.models.components import Components
    from diffstream.models.tiny import sd_scheduler, tiny_taesd
    from diffstream.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).eval().requires_grad_(False)

    def text(width, projection):
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2,
                             num_attention_heads=width // 64, max_position_embeddings=77, projection_dim=1280,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval().requires_grad_(False)

    return Components(unet=unet, vae=tiny_taesd(full_size=True), text_encoder=text(768, False),
                      tokenizer=clip_tokenizer(), scheduler=sd_scheduler(), name="sdxl-random",
                      text_encoder_2=text(1280, True), tokenizer_2=clip_tokenizer())


def full_size_units(unet, device):
    """(canny unit, depth unit) at real size with random weights."""
    from diffusers import ControlNetModel
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from diffstream.models.controlnet import ControlUnit, DepthMap, canny_map
    from diffstream.models.depth import DepthEstimator
    from diffstream.models.tiny import randomize

    units = []
    for i, kind in enumerate(("canny", "depth")):
        torch.manual_seed(10 + i)
        net = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        randomize(net.controlnet_mid_block, seed=i, std=0.01)  # zero convolutions would still cost the same
        net = net.to(device).eval().requires_grad_(False)
        if kind == "canny":
            pre = canny_map
        else:
            torch.manual_seed(20)
            dpt = DPTForDepthEstimation(DPTConfig()).eval()  # ViT-B/16 backbone
            processor = DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False)
            pre = DepthMap(DepthEstimator.from_components(dpt, processor, device=device))
        units.append(ControlUnit(kind=kind, model=net, preprocess=pre))
    return units


def ip_adapted(base, device):
    """A copy of `base` whose UNet carries a random SD 1.5-size IP-Adapter (4 image tokens
    from a 1024-wide CLIP ViT-H embedding, h94's ip-adapter_sd15 layout). Its image encoder
    runs once per image prompt, not per frame, so a small one stands in for ViT-H here."""
    import copy

    from diffstream.models.ip_adapter import IPAdapter, tiny_image_encoder, tiny_ip_adapter_state

    unet = copy.deepcopy(base.unet).cpu()
    encoder, processor = tiny_image_encoder()
    encoder.visual_projection = torch.nn.Linear(encoder.config.hidden_size, 1024, bias=False)
    encoder.config.projection_dim = 1024
    unet._load_ip_adapter_weights([tiny_ip_adapter_state(unet, 1024)])
    ip = IPAdapter(image_encoder=encoder.to(device), feature_extractor=processor, plus=False)
    return dataclasses.replace(base, unet=unet.to(device).eval().requires_grad_(False), ip_adapter=ip)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    parser.add_argument("--frames", type=int, default=4, help="frames timed per configuration")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"),
                        help="full-size architecture: SD 1.5 (with an IP-Adapter row) or SDXL base")
    args = parser.parse_args()

    from diffstream.config import StreamConfig
    from diffstream.pipelines.stream import StreamPipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = sd15_random_components() if args.arch == "sd15" else sdxl_random_components()
    base = dataclasses.replace(base, unet=base.unet.to(device), vae=base.vae.to(device),
                               text_encoder=base.text_encoder.to(device), device=device)
    canny, depth = full_size_units(base.unet, device)
    setups = {
        "plain": ((), None),
        "canny": ((canny,), (1.0,)),
        "depth": ((depth,), (1.0,)),
        "canny+depth": ((canny, depth), (1.0, 1.0)),
        "canny_scale_0": ((canny,), (0.0,)),
    }
    frames, origin = benchmark_clip(args.steps + args.frames + 1, args.size)
    cfg = StreamConfig(prompt="a watercolor painting", size=args.size, steps=args.steps, strength=0.5,
                       guidance=1.2, cfg_type="self")
    pipes = {name: StreamPipeline(dataclasses.replace(base, controlnets=units), cfg.replace(control_scales=scales))
             for name, (units, scales) in setups.items()}
    import tempfile

    import cv2

    image = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    cv2.imwrite(image, frames[0])
    if args.arch == "sd15":  # an SDXL-size copy of the UNet would not fit beside the others in 24 GB
        pipes["ip_adapter"] = StreamPipeline(ip_adapted(base, device), cfg.replace(ip_adapter_image=image))
        setups["ip_adapter"] = None
    times = {name: [] for name in setups}
    for i, frame in enumerate(frames):
        for name, pipe in pipes.items():  # interleaved: machine drift hits every setup alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = pipe.push(frame)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > args.steps:  # the stream batch is full and every kernel has run once
                assert out is not None
                times[name].append(time.perf_counter() - start)
    spf = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "arch": args.arch, "device": device.type, "size": args.size, "steps": args.steps, "frames_timed": args.frames,
        "clip": origin, "seconds_per_frame": {k: round(v, 4) for k, v in spf.items()},
        "ratio_to_plain": {k: round(v / spf["plain"], 3) for k, v in spf.items()},
    }
    for name in setups:
        print(f"{name:>14}: {spf[name]:.3f} s/frame  x{spf[name] / spf['plain']:.2f} of plain")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
