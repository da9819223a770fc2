"""Mutants of IP-Adapter in the stream (issue #17): the rows' image embeddings, the scale
each stream sets on a shared UNet, live image changes. Proofs: tests/pipelines/test_ip_adapter.py."""

from mutation import Patch, mutant

PIPE = "diffstream.pipelines.stream:StreamPipeline"
PROOFS = "tests/pipelines/test_ip_adapter.py"
DIFFUSERS = f"{PROOFS}::test_one_frame_equals_diffusers_img2img_with_an_image_prompt"
CHANGES = f"{PROOFS}::test_changes_apply_from_the_next_frame"
SHARED = f"{PROOFS}::test_streams_sharing_a_model_keep_their_own_scales"
EMBEDS = f"{PROOFS}::test_image_embeddings_equal_diffusers"

MUTANTS = [
    mutant("ip-uncond-rows-see-the-image", "the unconditional rows get the image's embeddings instead of the "
           "negative ones (guidance then cancels the image prompt)", DIFFUSERS,
           Patch(f"{PIPE}._ip_embeds", "torch.cat([neg.expand(u, *neg.shape[1:])", "torch.cat([pos.expand(u, *pos.shape[1:])")),
    mutant("ip-scale-set-once", "the scale is set on the UNet only once, so a change or another stream's "
           "scale is never (re)applied", [f"{CHANGES}[scale]", SHARED],
           Patch(f"{PIPE}._ip_embeds", 'if getattr(unet, "_diffstream_ip_scale", None) != self._ip_scale:',
                 'if getattr(unet, "_diffstream_ip_scale", None) is None:')),
    mutant("ip-image-change-ignored", "a new image prompt is not encoded until the stream restarts",
           f"{CHANGES}[image]",
           Patch(f"{PIPE}._apply_pending", "c.ip_adapter_image != self._ip_key", "self._ip_key == ()")),
    mutant("ip-scale-ignored", "the stream's scale is not applied: the adapter always runs at full weight",
           DIFFUSERS, Patch(f"{PIPE}._ip_embeds", "set_scale(unet, self._ip_scale)", "set_scale(unet, 1.0)")),
    mutant("ip-plus-negative-zeros", "IP-Adapter Plus's negative rows get zeros instead of a black image's "
           "hidden states", [f"{EMBEDS}[plus]", f"{DIFFUSERS}[plus]"],
           Patch("diffstream.models.ip_adapter:IPAdapter.embeds",
                 "neg = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]",
                 "neg = torch.zeros_like(pos)")),
    mutant("ip-plus-last-hidden-layer", "IP-Adapter Plus reads the image encoder's last hidden layer, not the "
           "penultimate", f"{EMBEDS}[plus]",
           Patch("diffstream.models.ip_adapter:IPAdapter.embeds",
                 "pos = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]",
                 "pos = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-1]")),
    mutant("image-prompt-any-string", "the web protocol's image prompt takes any string (a path or URL the "
           "server would then read)",
           "tests/server/test_protocol.py::test_image_prompt_message_takes_only_image_data_uris",
           Patch("diffstream.server.protocol:_image_prompt",
                 'if not isinstance(data, str) or not data.startswith("data:image/") or ";base64," not in data[:64]:',
                 "if not isinstance(data, str):")),
]
