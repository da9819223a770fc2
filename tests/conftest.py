"""Shared fixtures: one thread per test process and the tiny model, built once."""

import gc

import pytest
import torch

torch.set_num_threads(1)


def freeze_heap() -> None:
    """Collect garbage once, then move every object alive into the collector's permanent
    generation (`gc.freeze`). Modules, classes and session models never become garbage,
    yet each full collection walks them: with torch, diffusers and transformers loaded that
    is some 400,000 objects and 0.2 s per collection here, more as the suite goes on, and
    every nested session of the mutation suite collects twice. Objects made afterwards are
    collected as usual."""
    gc.collect()
    gc.freeze()


import diffusers  # noqa: E402,F401  (imported by nearly every test: frozen with torch)
import transformers  # noqa: E402,F401

freeze_heap()

# The session-wide models, whose UNets every test shares (released after each test).
_SHARED_COMPONENTS: list = []


def _shared(components):
    _SHARED_COMPONENTS.append(components)
    return components


@pytest.fixture(scope="session")
def tiny():
    """The tiny random SD model (4-channel UNet), fp32 on the CPU."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny", device="cpu")))


@pytest.fixture(scope="session")
def tiny_taesd_model():
    """The tiny model with a tiny random AutoencoderTiny instead of its KL VAE."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny", device="cpu", tiny_vae="tiny")))


@pytest.fixture(scope="session")
def tiny_sdxl():
    """The tiny random SDXL-architecture model, fp32 on the CPU."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny-sdxl", device="cpu")))


@pytest.fixture(scope="session")
def controlled():
    """The tiny model (the `tiny` fixture's weights) with a canny and a depth tiny ControlNet."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny", device="cpu",
                                               controlnets=(("canny", "tiny"), ("depth", "tiny")))))


@pytest.fixture(scope="session")
def adapted():
    """The tiny model (the `tiny` fixture's weights) with a random tiny IP-Adapter."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny", device="cpu", ip_adapter="tiny")))


@pytest.fixture(scope="session")
def adapted_plus():
    """The tiny model with a random tiny IP-Adapter Plus (resampler over the image encoder's
    penultimate hidden states)."""
    from diffstream.config import ModelConfig
    from diffstream.models.loading import load_components

    return _shared(load_components(ModelConfig(model="tiny", device="cpu", ip_adapter="tiny-plus")))


@pytest.fixture
def frames():
    from diffstream.testing import make_frames

    return make_frames(7)


@pytest.fixture(autouse=True)
def _release_shared_unets():
    """Each test starts with stock processors on the shared tiny UNets: streams a test
    left open are closed afterwards (as a process exit would): whoever holds the
    processor lease on a shared UNet gives it back."""
    yield
    from diffstream.attention.base import ProcessorLease

    for components in _SHARED_COMPONENTS:
        ProcessorLease.release(components.unet)


def pytest_collection_modifyitems(config, items):
    """The mutation suite (tests/mutants) runs last: its nested sessions patch the library
    and restore it, and running them after every other test keeps the rest of the suite
    independent of them even if a restore ever missed a binding."""
    items.sort(key=lambda item: "tests/mutants/" in str(item.path).replace("\\", "/"))
