"""Mutants of StreamV2V's feature bank (attention/feature_bank.py; issue #20): Eq. 1's
extended attention, Eq. 2's fusion, DyMe's merge, the fusion blocks and the per-(step,
branch) bank slots. Their proofs are in tests/attention/test_feature_bank_proofs.py.
The interval's mutant (bug 1 of issue #20) is in m_streaming.py."""

from mutation import Patch, mutant

FB = "diffstream.attention.feature_bank"
PROC = f"{FB}:FeatureBankAttnProcessor"
STATE = f"{FB}:FeatureBankState"
P = "tests/attention/test_feature_bank_proofs.py"
EQ1 = f"{P}::test_extended_attention_is_eq1_by_hand"
MASK1 = f"{P}::test_extended_attention_masks_unfilled_banks_per_row"
STORE = f"{P}::test_bank_stores_keys_values_with_heads_merged_in_order"
EQ2 = f"{P}::test_fusion_is_eq2_by_hand_on_a_shifted_frame"
INCLUSIVE = f"{P}::test_fusion_threshold_is_inclusive"
MASK2 = f"{P}::test_fusion_never_picks_an_unfilled_bank_token"
NO_FUSE = f"{P}::test_processor_without_fuse_does_not_fuse"
PRE_FUSION = f"{P}::test_bank_keeps_pre_fusion_outputs"
SD15 = f"{P}::test_fusion_layers_on_sd15_are_mid_and_up_blocks_1"
TINY_LAYERS = f"{P}::test_fusion_layers_on_the_tiny_unet"
DYME = f"{P}::test_dyme_update_is_the_bipartite_merge_by_hand"
SLOTS = f"{P}::test_each_row_reads_and_writes_the_bank_of_its_step_and_branch"
STREAM_SLOTS = f"{P}::test_stream_banks_every_row_into_its_step_and_branch"
QUEUE = "tests/attention/test_feature_bank.py::test_queue_bank_keeps_the_last_k_frames"

MUTANTS = [
    # --- Eq. 2: feature fusion ---------------------------------------------------------
    mutant("fusion-same-position", "fusion blends each token with the banked token at the same position, "
           "not the most similar one (Eq. 2's argmax)", EQ2,
           Patch(f"{PROC}._fuse", "nearest = torch.gather(bank_o, 1, index[..., None].expand(-1, -1, bank_o.shape[-1]))",
                 "nearest = bank_o[:, : out.shape[1]]")),
    mutant("fusion-alpha-swapped", "fusion weights swapped: alpha O_t + (1 - alpha) O_fb", EQ2,
           Patch(f"{PROC}._fuse", "fused = (1.0 - self.strength) * out + self.strength * nearest",
                 "fused = self.strength * out + (1.0 - self.strength) * nearest")),
    mutant("fusion-threshold-flipped", "fusion applied where the similarity is below the threshold", EQ2,
           Patch(f"{PROC}._fuse", "best >= self.threshold", "best < self.threshold")),
    mutant("fusion-threshold-strict", "a similarity exactly at the threshold is not fused (> instead of >=)",
           INCLUSIVE, Patch(f"{PROC}._fuse", "best >= self.threshold", "best > self.threshold")),
    mutant("fusion-dot-product", "the nearest banked output found by raw dot product instead of cosine similarity",
           EQ2, Patch(f"{PROC}._fuse", "sim = F.normalize(out.float(), dim=-1) @ F.normalize(bank_o.float(), dim=-1)",
                      "sim = out.float() @ bank_o.float()")),
    mutant("fusion-mask-ignored", "fusion may pick the zero padding of a slot whose bank is not filled yet",
           MASK2, Patch(f"{PROC}._fuse", "sim = sim.masked_fill(~valid[:, None, :], -2.0)", "pass")),
    mutant("fusion-every-layer", "fusion in every self-attention layer instead of the chosen blocks",
           [SD15, TINY_LAYERS], Patch(f"{FB}:FeatureBank.attach", "fuse=block_of(name) in fusion_blocks", "fuse=True")),
    mutant("fuse-flag-ignored", "the processor fuses whenever fusion is configured, whatever its layer",
           [NO_FUSE, SD15], Patch(f"{PROC}.__init__", "self.fuse = fuse and state.config.fusion",
                                  "self.fuse = state.config.fusion")),
    mutant("block-of-mid-block", "block_of names the mid block 'mid_block.attentions', so it never fuses",
           [SD15, TINY_LAYERS], Patch("diffstream.attention.base:block_of",
                                      'parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])',
                                      '".".join(parts[:2])')),
    mutant("bank-stores-fused-output", "the bank is updated with the fused output instead of the frame's own",
           PRE_FUSION, Patch(f"{PROC}.__call__", "self._update(bank, own_k, own_v, own_o)",
                             "self._update(bank, own_k, own_v, out)")),
    # --- Eq. 1: extended self-attention ------------------------------------------------------
    mutant("ext-attn-bank-only", "banked keys/values replace the frame's own instead of being concatenated",
           EQ1, Patch(f"{PROC}.__call__", "key = torch.cat([key, bank_k.view(batch, m, heads, d).transpose(1, 2)], dim=2)\n"
                      "            value = torch.cat([value, bank_v.view(batch, m, heads, d).transpose(1, 2)], dim=2)",
                      "key = bank_k.view(batch, m, heads, d).transpose(1, 2)\n"
                      "            value = bank_v.view(batch, m, heads, d).transpose(1, 2)")),
    mutant("ext-attn-heads-layout", "banked (M, heads*d) tokens split into heads as (heads, M, d)", EQ1,
           Patch(f"{PROC}.__call__", "bank_k.view(batch, m, heads, d).transpose(1, 2)", "bank_k.reshape(batch, heads, m, d)")),
    mutant("bank-heads-merged-wrong", "the update merges heads without the transpose ((B, heads, L, d) read as (B, L, C))",
           [STORE, EQ1], Patch(f"{PROC}.__call__", "own_k = own_k.transpose(1, 2).reshape(batch, length, heads * d)",
                               "own_k = own_k.reshape(batch, length, heads * d)")),
    mutant("ext-attn-mask-ignored", "while banks fill, rows with an empty slot attend to its zero tokens", MASK1,
           Patch(f"{PROC}.__call__", "if valid is not None:", "if False:")),
    mutant("extend-flag-ignored", "extended attention runs even when disabled", [EQ2],
           Patch(f"{PROC}.__init__", "self.extend = state.config.extended_attention", "self.extend = True")),
    # --- DyMe (Sec. 4.3) and the queue -------------------------------------------------------
    mutant("dyme-match-values", "DyMe matches tokens on values instead of keys", DYME,
           Patch(f"{PROC}._update", "assign = dyme_assign(bank.key[slot], key[r],", "assign = dyme_assign(bank.value[slot], value[r],")),
    mutant("dyme-dst-not-counted", "DyMe's average divides by the number of sources, not counting the destination",
           DYME, Patch(f"{FB}:dyme_apply", "count = torch.ones(m, device=tokens.device)", "count = torch.zeros(m, device=tokens.device)")),
    mutant("dyme-dot-product", "DyMe matches by raw dot product instead of cosine similarity", DYME,
           Patch(f"{FB}:dyme_assign", "sim = F.normalize(tokens[src_idx].float(), dim=-1) @ F.normalize(tokens[dst_idx].float(), dim=-1).T",
                 "sim = tokens[src_idx].float() @ tokens[dst_idx].float().T")),
    mutant("dyme-concat-order", "DyMe's assignment indexes [bank; current] while the merge applies it to [current; bank]",
           DYME, Patch(f"{FB}:dyme_assign", "tokens = torch.cat([new_keys, bank_keys], dim=0)",
                       "tokens = torch.cat([bank_keys, new_keys], dim=0)")),
    mutant("queue-drops-newest", "the FIFO queue keeps its oldest frame and drops the newest banked one", QUEUE,
           Patch(f"{PROC}._update", "store[slot] = torch.cat([store[slot, length:], new[r]], dim=0)",
                 "store[slot] = torch.cat([store[slot, :length], new[r]], dim=0)")),
    mutant("dyme-split-layer-order", "an update's DyMe permutations drawn with the layers in reverse call order",
           "tests/attention/test_feature_bank.py::test_dyme_splits_are_drawn_once_per_update_per_row_seeded_by_slot_and_frame",
           Patch(f"{STATE}._draw_orders", "for name, bank in self.layers.items():",
                 "for name, bank in reversed(self.layers.items()):")),
    # --- slots: one bank per (step, branch) ----------------------------------------------------
    mutant("bank-write-row-index", "the update writes row r into slot r instead of its (step, branch) slot",
           [SLOTS, STREAM_SLOTS], Patch(f"{PROC}._update", "for r, slot in enumerate(self.state.rows):",
                                        "for r, slot in enumerate(range(len(self.state.rows))):")),
    mutant("bank-slot-row-index", "the slot map is the row index (rows != slots once guidance rows exist)",
           [SLOTS, STREAM_SLOTS], Patch("diffstream.attention.base:BatchLayout.slots",
                                        'return tuple((b == "uncond") * self.num_steps + s for s, b in zip(self.steps, self.branches))',
                                        "return tuple(range(len(self.steps)))")),
    mutant("bank-read-other-branch", "extended attention reads the bank of the other guidance branch",
           SLOTS, Patch(f"{STATE}.gather", "rows = tensor.index_select(0, layout.slot_index(tensor.device))",
                        "rows = tensor.index_select(0, (layout.slot_index(tensor.device) + layout.num_steps) % self.num_slots)")),
    mutant("bank-read-row-index", "gather reads the first B slots instead of the rows' slots",
           SLOTS, Patch(f"{STATE}.gather", "rows = tensor.index_select(0, layout.slot_index(tensor.device))",
                        "rows = tensor[: len(self.rows)]")),
]
