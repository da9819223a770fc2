"""StreamV2V's feature bank: extended self-attention, feature fusion, dynamic merging.

Liang et al., "Looking Backward: Streaming Video-to-Video Translation with Feature
Banks" (ICLR 2025), Sec. 4. A per-frame img2img stream flickers because each frame is
denoised alone. StreamV2V keeps, for every self-attention layer, a bank of keys, values
and outputs of past frames and lets the current frame look back at it:

- Extended self-attention (Sec. 4.1, Eq. 1):
      ExAttn = softmax(Q_t [K_t, K_fb]^T / sqrt(d)) [V_t, V_fb]
  in every self-attention layer at every denoising step.
- Feature fusion (Sec. 4.2, Eq. 2): each output token O_t(p) is blended with its most
  cosine-similar banked token, (1 - alpha) O_t(p) + alpha O_fb(q), only where the
  similarity passes a threshold, and only in the low-resolution blocks (mid block and
  the first two up blocks, Appendix A.3: fusing high-resolution features blurs detail).
  The processor sees the self-attention sublayer's output (after its projection), so
  that is the O we bank and fuse.
- Bank update (Sec. 4.3): every `interval` frames (the paper's 4), the current
  features enter the bank by dynamic merging (DyMe): concatenate current and banked
  tokens, split them at random into source and destination sets, and average every
  source token into its most similar destination token, so the bank keeps a fixed size
  (one frame's tokens by default, Sec. 5.4.2). A FIFO queue of k frames is the paper's
  ablation (Table 2).

With the stream batch, the rows of one UNet call are different frames at different
denoising steps, so every step slot (and guidance branch) has its own bank: features
only meet features of the same noise level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffstream.attention.base import (
    compiler_opaque,
    BatchLayout,
    Mechanism,
    SDPAAttnProcessor,
    attend,
    attention_inputs,
    attention_output,
    block_of,
    install_processors,
    is_self_attention,
)


@dataclass(frozen=True)
class FeatureBankConfig:
    """Settings of the StreamV2V feature bank.

    Attributes:
        extended_attention: concatenate banked keys/values in self-attention (Eq. 1).
        fusion: blend outputs with their nearest banked output (Eq. 2).
        fusion_strength: alpha of Eq. 2. Deliberate deviation: we take the paper's text
            (0.75, Sec. 5.1); the reference code's default `feature_injection_strength`
            is 0.8. Pass 0.8 to match the code.
        fusion_threshold: minimum cosine similarity for a token to be fused. The paper
            gives no number; 0.98 fuses only near-identical features, so regions new to
            the scene (low similarity to anything banked) are left alone, which is the
            misalignment the paper's mask guards against.
        fusion_blocks: UNet blocks whose self-attention outputs are fused (Appendix A.3).
        bank: "dyme" (dynamic merging, fixed size) or "queue" (FIFO of whole frames).
        bank_size: bank capacity in frames' worth of tokens (DyMe default 1; the
            queue ablation uses 2).
        interval: update the bank every this many frames (Sec. 5.1: 4). With the stream
            batch, frame f's features at step k are banked when (f + k) is a multiple of
            it: StreamV2V's reference, whose counter advances once per batched call.
        seed: seeds DyMe's random source/destination split. Deliberate deviation: the
            reference draws the split from torch's global generator; here each update's
            split comes from a generator seeded by (stream seed, slot, frame), so a run
            is reproducible, the same on every device, and independent of batching.
    """

    extended_attention: bool = True
    fusion: bool = True
    fusion_strength: float = 0.75
    fusion_threshold: float = 0.98
    fusion_blocks: tuple[str, ...] = ("mid_block", "up_blocks.0", "up_blocks.1")
    bank: str = "dyme"
    bank_size: int = 1
    interval: int = 4
    seed: int = 0

    def __post_init__(self):
        from diffstream.errors import ConfigError

        if self.bank not in ("dyme", "queue"):
            raise ConfigError(f"--bank must be 'dyme' or 'queue:K', got {self.bank!r}")
        if self.bank_size < 1:
            raise ConfigError(f"--bank-size must be >= 1, got {self.bank_size}")
        if self.interval < 1:
            raise ConfigError(f"--bank-interval must be >= 1, got {self.interval}")
        if not 0.0 <= self.fusion_strength <= 1.0:
            raise ConfigError(f"--fusion-strength must be in [0, 1], got {self.fusion_strength}")
        if not self.fusion_blocks and self.fusion:
            raise ConfigError("--fusion-blocks must name at least one block (or pass --no-fusion)")


class LayerBank:
    """Banked keys, values and outputs of one self-attention layer, one bank per slot.

    Tensors are (S, M, C): S slots (step x branch), M = capacity in tokens, C channels.
    `filled[s]` is how many of slot s's M tokens are valid (host-side ints: no syncs).
    """

    def __init__(self, num_slots: int, capacity: int, channels: int, out_channels: int, like: torch.Tensor):
        shape = (num_slots, capacity, channels)
        self.key = like.new_zeros(shape)
        self.value = like.new_zeros(shape)
        self.output = like.new_zeros((num_slots, capacity, out_channels))
        self.filled = [0] * num_slots
        self.capacity = capacity


def dyme_assign(bank_keys: torch.Tensor, new_keys: torch.Tensor, generator: torch.Generator | None = None,
                order: torch.Tensor | None = None):
    """DyMe's bipartite assignment (Sec. 4.3, after token merging, Bolya et al.).

    The current frame's tokens and the banked tokens are concatenated (new first) and
    split at random into M destinations and L sources; each source goes to its most
    cosine-similar destination.

    Args:
        bank_keys: (M, C) banked keys (the similarity metric).
        new_keys: (L, C) the current frame's keys.
        generator: CPU generator for the random split (drawn here, then copied), or
        order: (L + M,) the split's permutation, already drawn and on the keys' device
            (the processors' path: `FeatureBankState` draws all of an update's at once).
    Returns:
        (dst_idx (M,), src_idx (L,), target (L,)): indices into the concatenation and,
        for each source, the position in dst_idx it merges into.
    """
    m = bank_keys.shape[0]
    tokens = torch.cat([new_keys, bank_keys], dim=0)  # (N, C), N = L + M
    if order is None:
        order = torch.randperm(tokens.shape[0], generator=generator).to(tokens.device)
    dst_idx, src_idx = order[:m], order[m:]
    sim = F.normalize(tokens[src_idx].float(), dim=-1) @ F.normalize(tokens[dst_idx].float(), dim=-1).T  # (L, M)
    return dst_idx, src_idx, sim.argmax(dim=-1)


def dyme_apply(tokens: torch.Tensor, dst_idx: torch.Tensor, src_idx: torch.Tensor, target: torch.Tensor):
    """Average every destination with the sources assigned to it.

    Args:
        tokens: (N, C) the concatenation [new; bank] of any tensor aligned with the keys
            (keys, values or outputs), so pairs stay together.
    Returns:
        (M, C): merged token j = mean({tokens[dst_idx[j]]} U {tokens[src_idx[i]] : target[i] = j}).
    """
    m = dst_idx.shape[0]
    total = tokens[dst_idx].float().index_add(0, target, tokens[src_idx].float())
    count = torch.ones(m, device=tokens.device).index_add(
        0, target, torch.ones(target.shape[0], device=tokens.device)
    )
    return (total / count[:, None]).to(tokens.dtype)


class FeatureBankState:
    """All per-stream tensors of the feature bank, and the slot map of the current call."""

    def __init__(self, config: FeatureBankConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Empty every bank and restart the random stream."""
        self.layers: dict[str, LayerBank] = {}
        self.calls = 0  # UNet calls seen
        self.frames = 0  # frames that entered the stream (calls with a step-0 row)
        self.update_now = False
        self.num_slots = 0
        self.layout: BatchLayout | None = None
        self.rows: tuple[int, ...] = ()  # slot of each UNet row in the current call (layout.slots)
        self._valid: dict = {}  # (fill counts, device) -> (B, M') bool mask while banks fill
        self._orders: dict = {}  # (layer, row) -> DyMe permutation of this update, on the device

    def begin_call(self, layout: BatchLayout) -> None:
        """Map this call's rows to bank slots (`layout.slots`: branch * num_steps + step)."""
        num_slots = 2 * layout.num_steps
        if num_slots != self.num_slots:  # a new schedule: banks of other steps mean nothing
            self.layers.clear()
            self._valid.clear()
            self.num_slots = num_slots
        self.layout = layout
        self.rows = layout.slots
        # The interval counts frames, not UNet calls (Sec. 5.1: "every 4 frames"). A frame
        # enters the stream in the call that holds its step-0 row; the rows of one stream
        # batch are consecutive frames, newest first, at consecutive steps, so every row
        # has the same frame + step: the newest frame's index plus the lowest step. A row
        # is banked when that sum is a multiple of the interval, which is the reference's
        # "every 4th stream-batch call" with the stream batch, and the same frames at the
        # same steps without it (one frame, steps 0..n-1, one call each).
        if 0 in layout.steps:
            self.frames += 1
        self.update_now = (self.frames - 1 + min(layout.steps)) % self.config.interval == 0
        self.calls += 1
        self._orders = {}
        if self.update_now and self.config.bank == "dyme":
            self._draw_orders()

    def row_frames(self) -> tuple[int, ...]:
        """Index (0, 1, ...) of the frame each row of the current call belongs to: the
        rows are consecutive frames, newest first, one step apart (`begin_call`)."""
        newest, lo = self.frames - 1, min(self.layout.steps)
        return tuple(newest - (step - lo) for step in self.layout.steps)

    def split_generator(self, slot: int, frame: int) -> torch.Generator:
        """The CPU generator of one bank update: seeded from (seed, slot, frame), so a
        row's split does not depend on which other rows share its UNet call (the same
        with and without the stream batch) nor on the device."""
        mixed = (int(self.config.seed) * 0x9E3779B1 + frame * 4099 + slot) % (2**63)
        return torch.Generator().manual_seed(mixed)

    def _draw_orders(self) -> None:
        """Every DyMe permutation of this update, drawn now and moved to the device at once.

        Each row draws from its own `split_generator(slot, frame)`, one permutation per
        layer in call order, on the CPU (the same split on every device); only one
        host-to-device copy per update is left instead of one per layer and row. Rows
        whose bank is not yet full (appended to, not merged) draw nothing.
        """
        spans, draws, offset = {}, [], 0
        for r, (slot, frame) in enumerate(zip(self.rows, self.row_frames())):
            generator = None
            for name, bank in self.layers.items():  # created in call order by the first call
                length = bank.capacity // self.config.bank_size  # the layer's tokens per frame
                tokens = length + bank.capacity
                if bank.filled[slot] + length > bank.capacity:
                    generator = generator or self.split_generator(slot, frame)
                    draws.append(torch.randperm(tokens, generator=generator))
                    spans[(name, r)] = (offset, tokens)
                    offset += tokens
        if draws:
            device = next(iter(self.layers.values())).key.device
            flat = torch.cat(draws).to(device)  # (sum of L + M,)
            self._orders = {key: flat[lo : lo + n] for key, (lo, n) in spans.items()}

    def order(self, layer: str, row: int) -> torch.Tensor:
        """The DyMe permutation (L + M,) drawn for `row` of `layer` in this update."""
        return self._orders[(layer, row)]

    def gather(self, bank: LayerBank, tensor: torch.Tensor):
        """Banked tokens of this call's rows.

        Returns:
            (B, M', C) tokens and a (B, M') bool mask of valid ones (None if all valid),
            or (None, None) when every row's bank is empty.
        """
        filled = tuple(bank.filled[s] for s in self.rows)
        longest = max(filled)
        if longest == 0:
            return None, None
        layout = self.layout
        if layout.slot_slice is not None:
            rows = tensor[layout.slot_slice]  # a view
        else:
            rows = tensor.index_select(0, layout.slot_index(tensor.device))
        rows = rows[:, :longest]  # (B, M', C)
        if min(filled) == longest:
            return rows, None
        valid = self._valid.get((filled, tensor.device))
        if valid is None:  # banks still filling: one copy per fill pattern, not per layer
            mask = torch.zeros((len(filled), longest), dtype=torch.bool)
            for r, f in enumerate(filled):
                mask[r, :f] = True
            valid = self._valid[(filled, tensor.device)] = mask.to(tensor.device)
        return rows, valid


class FeatureBankAttnProcessor(SDPAAttnProcessor):
    """Self-attention with StreamV2V's extended attention, fusion and bank updates."""

    def __init__(self, state: FeatureBankState, name: str, fuse: bool):
        self.state = state
        self.name = name
        self.fuse = fuse and state.config.fusion
        self.extend = state.config.extended_attention
        self.strength = float(state.config.fusion_strength)
        self.threshold = float(state.config.fusion_threshold)

    def _bank(self, key: torch.Tensor, out_channels: int) -> LayerBank:
        """This layer's bank, created for this layer's token count on first use. key (B, heads, L, d)."""
        state = self.state
        _, heads, length, d = key.shape
        bank = state.layers.get(self.name)
        capacity = state.config.bank_size * length
        if bank is None or bank.capacity != capacity or bank.key.shape[-1] != heads * d:
            bank = state.layers[self.name] = LayerBank(state.num_slots, capacity, heads * d, out_channels, key)
        return bank

    @compiler_opaque  # stateful: the compiled graphs stop here (attention.base)
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        state = self.state
        inputs = attention_inputs(attn, hidden_states, encoder_hidden_states, temb)
        query, key, value = inputs.query, inputs.key, inputs.value  # (B, heads, L, d)
        batch, heads, length, d = key.shape
        own_k, own_v = key, value
        bank = self._bank(key, attn.to_out[0].out_features)

        mask = None
        if self.extend:
            bank_k, valid = state.gather(bank, bank.key)
            if bank_k is not None:
                bank_v, _ = state.gather(bank, bank.value)
                m = bank_k.shape[1]
                # (B, M, C) -> (B, heads, M, d), appended after the frame's own tokens (Eq. 1)
                key = torch.cat([key, bank_k.view(batch, m, heads, d).transpose(1, 2)], dim=2)
                value = torch.cat([value, bank_v.view(batch, m, heads, d).transpose(1, 2)], dim=2)
                if valid is not None:
                    keep_own = torch.ones((batch, length), dtype=torch.bool, device=valid.device)
                    mask = torch.cat([keep_own, valid], dim=1)[:, None, None, :]  # (B, 1, 1, L + M)
        out = attend(query, key, value, mask)
        out = attention_output(attn, out, inputs)  # (B, L, C_out)

        own_o = out
        if self.fuse:
            bank_o, valid = state.gather(bank, bank.output)
            if bank_o is not None:
                out = self._fuse(out, bank_o, valid)
        if state.update_now:
            # (B, heads, L, d) -> (B, L, C): the bank stores tokens with heads merged
            own_k = own_k.transpose(1, 2).reshape(batch, length, heads * d)
            own_v = own_v.transpose(1, 2).reshape(batch, length, heads * d)
            self._update(bank, own_k, own_v, own_o)
        return out

    def _fuse(self, out: torch.Tensor, bank_o: torch.Tensor, valid) -> torch.Tensor:
        """Eq. 2 where the nearest banked token is similar enough. out (B, L, C), bank_o (B, M, C)."""
        sim = F.normalize(out.float(), dim=-1) @ F.normalize(bank_o.float(), dim=-1).transpose(1, 2)  # (B, L, M)
        if valid is not None:
            sim = sim.masked_fill(~valid[:, None, :], -2.0)
        best, index = sim.max(dim=-1)  # (B, L)
        nearest = torch.gather(bank_o, 1, index[..., None].expand(-1, -1, bank_o.shape[-1]))  # (B, L, C)
        fused = (1.0 - self.strength) * out + self.strength * nearest
        return torch.where((best >= self.threshold)[..., None], fused, out)

    def _update(self, bank: LayerBank, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """Put each row's features into its slot's bank (Sec. 4.3). Shapes (B, L, C)."""
        cfg = self.state.config
        length = key.shape[1]
        for r, slot in enumerate(self.state.rows):
            filled = bank.filled[slot]
            if filled + length <= bank.capacity:  # not full yet: append whole frames
                bank.key[slot, filled : filled + length] = key[r]
                bank.value[slot, filled : filled + length] = value[r]
                bank.output[slot, filled : filled + length] = output[r]
                bank.filled[slot] = filled + length
            elif cfg.bank == "queue":  # FIFO: drop the oldest frame's tokens
                for store, new in ((bank.key, key), (bank.value, value), (bank.output, output)):
                    store[slot] = torch.cat([store[slot, length:], new[r]], dim=0)
            else:  # DyMe: one assignment from the keys, applied to keys, values, outputs
                assign = dyme_assign(bank.key[slot], key[r], order=self.state.order(self.name, r))
                for store, new in ((bank.key, key), (bank.value, value), (bank.output, output)):
                    store[slot] = dyme_apply(torch.cat([new[r], store[slot]], dim=0), *assign)


class FeatureBank(Mechanism):
    """The StreamV2V method as a stream-engine mechanism.

    Args:
        config: the bank's settings.
    """

    name = "streamv2v"

    def __init__(self, config: FeatureBankConfig | None = None):
        self.config = config or FeatureBankConfig()
        self.state = FeatureBankState(self.config)

    def attach(self, unet):
        """Install bank processors on every self-attention layer; cross-attention is untouched."""
        fusion_blocks = set(self.config.fusion_blocks)

        def make(name, proc):
            if not is_self_attention(name):
                return None
            return FeatureBankAttnProcessor(self.state, name, fuse=block_of(name) in fusion_blocks)

        return install_processors(unet, make)

    def reset(self) -> None:
        self.state.reset()

    def before_unet(self, layout: BatchLayout) -> None:
        self.state.begin_call(layout)

    def bank_bytes(self) -> int:
        """Bytes of the storage behind all banks (constant once every slot is full).

        Counts each distinct storage once, whole: a view that pinned a larger buffer, or
        a bank that grew, would show here.
        """
        storages = {}
        for bank in self.state.layers.values():
            for t in (bank.key, bank.value, bank.output):
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def parse_bank(spec: str) -> tuple[str, int | None]:
    """`dyme` -> ("dyme", None); `queue:2` -> ("queue", 2) (the CLI's --bank syntax)."""
    from diffstream.errors import ConfigError

    kind, _, size = spec.partition(":")
    if kind not in ("dyme", "queue"):
        raise ConfigError(f"--bank must be 'dyme' or 'queue:K', got {spec!r}")
    if not size:
        return kind, None
    try:
        return kind, int(size)
    except ValueError:
        raise ConfigError(f"--bank size must be an integer, got {spec!r}") from None

