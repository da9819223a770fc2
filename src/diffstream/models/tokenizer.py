"""The real CLIP BPE tokenizer, built offline from the vocabulary we ship.

`assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's byte-pair-encoding merge list
(MIT licence), as distributed inside the open-clip-torch wheel. Stable Diffusion 1.x's
tokenizer is exactly this vocabulary: 256 byte symbols, their 256 end-of-word forms,
48,894 merges and the two special tokens, 49,408 ids in all. We turn the merge list into
the `vocab.json` + `merges.txt` pair that transformers' `CLIPTokenizer` reads, once per
machine, so the tiny test model tokenises text exactly like a real SD checkpoint.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path

_ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file (the rest were never trained on).
_NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _cache_dir() -> Path:
    root = os.environ.get("DIFFSTREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffstream"
    )
    return Path(root) / "clip_tokenizer"


def write_vocab_files(directory: Path) -> tuple[Path, Path]:
    """Write `vocab.json` and `merges.txt` for the CLIP tokenizer into `directory`.

    Returns:
        (vocab_path, merges_path).
    """
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(_ASSET, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab_list) == VOCAB_SIZE, len(vocab_list)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    # Write to temporary names first so a concurrent reader never sees half a file.
    tmp_vocab, tmp_merges = vocab_path.with_suffix(".tmp%d" % os.getpid()), merges_path.with_suffix(
        ".tmp%d" % os.getpid()
    )
    tmp_vocab.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tmp_merges.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    os.replace(tmp_vocab, vocab_path)
    os.replace(tmp_merges, merges_path)
    return vocab_path, merges_path


@functools.lru_cache(maxsize=1)
def clip_tokenizer(model_max_length: int = 77):
    """The CLIP tokenizer of Stable Diffusion 1.x, built offline.

    Returns:
        a `transformers.CLIPTokenizer` (49,408 tokens, pads with <|endoftext|>, 77 positions).
    """
    from transformers import CLIPTokenizer

    directory = _cache_dir()
    if not ((directory / "vocab.json").exists() and (directory / "merges.txt").exists()):
        write_vocab_files(directory)
    # from_pretrained on the folder reads vocab.json + merges.txt in every transformers
    # release (the constructor's argument names changed between 4.x and 5.x).
    return CLIPTokenizer.from_pretrained(
        str(directory), model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def _token_ids(tokenizer, text: str) -> list[int]:
    """`text`'s token ids without start/end tokens and without truncation.

    An explicit `max_length` above any possible count (a character is at most 4 byte
    tokens) keeps transformers from logging "sequence length is longer than...".
    """
    return tokenizer(text, add_special_tokens=False, max_length=4 * len(text) + 8, truncation=False).input_ids


def truncation_note(tokenizer, prompt: str, max_length: int = 77) -> str | None:
    """A one-line note if CLIP cuts `prompt`, naming the words where it was cut; else None.

    A CLIP text encoder sees at most `max_length` tokens including its start and end
    tokens, so `max_length - 2` tokens of text; `Components.encode_prompt` drops the rest
    without a word. This counts tokens (tokenizer calls only, no model) and names, in the
    prompt's own spelling, the last words kept and the words ignored. Callers warn once
    per distinct prompt; it is not meant for the per-frame path.

    Args:
        tokenizer: a CLIP tokenizer (`transformers.CLIPTokenizer` or its fast twin).
        prompt: the text as the user wrote it.
        max_length: the text encoder's positions (77 for every SD 1.x/2.x CLIP).
    Returns:
        None when nothing is cut, else e.g. "prompt is longer than CLIP's 77 tokens
        (it has 81): cut after '... painting in the style of'; ignored: 'van gogh'".
        A cut inside a word says so: "cut after '... of van' (inside 'goghesque')".
    """
    budget = max_length - 2  # <|startoftext|> and <|endoftext|> take two positions
    ids = _token_ids(tokenizer, prompt)
    if len(ids) <= budget:
        return None
    # CLIP's BPE never merges across whitespace, so the prompt's tokens are its words'
    # tokens in order: walk the words to the one the budget ends in.
    words = prompt.split()
    used, cut = 0, None
    for i, word in enumerate(words):
        n = len(_token_ids(tokenizer, word))
        if used + n > budget:
            cut = i
            break
        used += n
    if cut is None:  # per-word counts disagree with the whole (odd text cleaning): decode
        kept = tokenizer.decode(ids[:budget]).split()
        ignored, inside = tokenizer.decode(ids[budget:]).strip(), ""
    else:
        kept, ignored = words[:cut], " ".join(words[cut:])
        inside = f" (inside '{words[cut]}')" if used < budget else ""
    tail = ("... " if len(kept) > 6 else "") + (" ".join(kept[-6:]) or "")
    if len(ignored) > 60:
        ignored = ignored[:57].rstrip() + "..."
    return (
        f"prompt is longer than CLIP's {max_length} tokens (it has {len(ids) + 2}): "
        f"cut after '{tail}'{inside}; ignored: '{ignored}'"
    )


class TruncationWarner:
    """Calls `warn(note)` the first time each distinct prompt would be cut by CLIP.

    For the edges that receive prompts (CLI arguments, web-demo prompt updates): call it
    with every prompt before it reaches `encode_prompt`; repeats cost a set lookup.

    Args:
        tokenizer: the model's CLIP tokenizer (`Components.tokenizer`).
        warn: called with the one-line note of `truncation_note`.
        max_length: the text encoder's positions.
    """

    def __init__(self, tokenizer, warn, max_length: int = 77):
        self.tokenizer, self.warn, self.max_length = tokenizer, warn, max_length
        self._seen: set[str] = set()

    def __call__(self, prompt: str | None) -> str | None:
        """Check `prompt` (None and "" are fine); returns the note when it warned."""
        if not prompt or prompt in self._seen:
            return None
        self._seen.add(prompt)
        note = truncation_note(self.tokenizer, prompt, self.max_length)
        if note is not None:
            self.warn(note)
        return note
