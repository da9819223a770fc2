"""diffstream: text-driven video-to-video translation with image diffusion models.

The public API is re-exported lazily so that `import diffstream` stays cheap
(diffusers and transformers load only when a model does).
"""

__version__ = "0.1.0"

__all__ = ["StreamPipeline", "StreamConfig", "ModelConfig", "load_components"]


def __getattr__(name):
    if name == "StreamPipeline":
        from diffstream.pipelines.stream import StreamPipeline

        return StreamPipeline
    if name in ("StreamConfig", "ModelConfig"):
        from diffstream import config

        return getattr(config, name)
    if name == "load_components":
        from diffstream.models.loading import load_components

        return load_components
    raise AttributeError(name)
