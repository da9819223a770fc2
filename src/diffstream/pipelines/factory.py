"""Builds the stream pipeline for a method name: the one place methods are wired in."""

from __future__ import annotations

from diffstream.config import StreamConfig
from diffstream.models.components import Components
from diffstream.pipelines.stream import StreamPipeline


def make_mechanism(config: StreamConfig, components: Components | None = None):
    """The temporal mechanism of `config.method` (None for the per-frame StreamDiffusion baseline).

    Raises:
        ConfigError: `components` has motion modules (a video UNet) and the method is a
            per-frame image method, which cannot run on one; or the method and the model
            do not go together (causal-video runs on a Wan video model, and only it does).
    """
    if components is not None and getattr(components, "is_wan", False) != (config.method == "causal-video"):
        from diffstream.errors import ConfigError

        if config.method == "causal-video":
            raise ConfigError("--method causal-video runs on a Wan video model: pass --model tiny-wan or a Wan "
                              "diffusers folder")
        raise ConfigError(f"this model is a Wan video model: it runs --method causal-video, not {config.method}")
    if components is not None and getattr(components, "is_video_unet", False) and config.method != "live2diff":
        from diffstream.errors import ConfigError

        raise ConfigError(f"--method {config.method} runs on an image UNet, but this model has motion modules "
                          f"(--motion-adapter): use --method live2diff, or leave --motion-adapter out")
    if config.method == "streamdiffusion":
        return None
    if config.method == "streamv2v":
        import dataclasses

        from diffstream.attention.feature_bank import FeatureBank

        # The bank's random split follows the stream's seed, so runs are reproducible.
        return FeatureBank(dataclasses.replace(config.feature_bank, seed=config.seed))
    if config.method == "causal-video":
        from diffstream.attention.block_causal import BlockCausal

        return BlockCausal(config.video.block_causal)
    if config.method == "live2diff":
        from diffstream.attention.causal_temporal import CausalTemporal

        conditioner = prior = None
        if config.causal.depth:
            if components is None:
                raise ValueError("live2diff with depth needs the components")
            conditioner, prior = _depth_parts(components, config.causal.depth_model)
        return CausalTemporal(config.causal, conditioner=conditioner, depth_prior=prior)
    raise ValueError(f"unknown method {config.method!r}")


def _depth_parts(components: Components, depth_model: str):
    """Depth conditioner (pixels -> depth latent, on the model's device) and depth-prior
    module for live2diff's --depth."""
    from diffstream.errors import ConfigError
    from diffstream.models.depth import DepthConditioner, DepthEstimator
    from diffstream.models.motion import DepthPrior

    prior = DepthPrior(out_channels=components.unet.config.block_out_channels[0])
    if components.depth_prior_state is not None:
        prior.load_state_dict(components.depth_prior_state)
    elif components.name == "tiny":
        from diffstream.models.tiny import randomize

        randomize(prior, seed=11)  # a test model whose depth path actually does something
    else:
        raise ConfigError(
            "--depth needs a motion checkpoint with Live2Diff's depth module "
            "(pass --motion-adapter /path/to/live2diff.ckpt), or leave --depth out"
        )
    if depth_model == "tiny":
        from diffstream.models.tiny import tiny_depth_estimator

        estimator = tiny_depth_estimator().to(components.device)
    else:
        estimator = DepthEstimator(depth_model, device=components.device)
    return DepthConditioner(estimator, components.encode_image), prior.eval().requires_grad_(False)


def make_pipeline(components: Components, config: StreamConfig):
    """The stream pipeline running `config.method` on `components`: a `StreamPipeline`, or
    for causal-video (a Wan model) a `CausalVideoPipeline`, which has the same interface."""
    mechanism = make_mechanism(config, components)
    if config.method == "causal-video":
        from diffstream.pipelines.causal_video import CausalVideoPipeline

        return CausalVideoPipeline(components, config, mechanism)
    return StreamPipeline(components, config, mechanism)
