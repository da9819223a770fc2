"""Word alignment between a source and a target prompt (Prompt-to-Prompt refinement).

FateZero fuses the cross-attention maps "of the unchanged part of the prompt similar to
Prompt-to-Prompt" (Sec. 3.2; Hertz et al. 2022, Sec. 3.2 "word swap / adding a new
phrase"). Which target token's map comes from which source token is decided here, on
the token sequences the text encoder actually sees (CLIP BPE, padded to 77):

- tokens shared by both prompts are matched by a longest common subsequence, so
  replaced, inserted and removed words all fall out of one alignment: a replaced word
  is a deletion plus an insertion, an inserted word maps to nothing (its own map is
  kept), a removed source word is simply never read;
- the padding tails are part of the sequences, so the k-th padding token after the
  target's end-of-text token reads the k-th padding token of the source, even when the
  prompts have different lengths;
- words are located by their token ids (a word or phrase tokenised alone is a
  contiguous run of the prompt's tokens, because CLIP splits text on spaces and
  punctuation before byte-pair encoding).
"""

from __future__ import annotations

from diffstream.errors import ConfigError


def token_ids(tokenizer, prompt: str) -> list[int]:
    """The ids the text encoder sees: BOS, tokens, EOS, padding, truncated to the model length (77)."""
    length = tokenizer.model_max_length
    return list(tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids)


def prompt_length(tokenizer, prompt: str) -> int:
    """Tokens of `prompt` with BOS and EOS, after truncation to the model length."""
    ids = token_ids(tokenizer, prompt)
    return ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)


def align_tokens(source: list[int], target: list[int]) -> list[int]:
    """Longest-common-subsequence alignment of two token sequences.

    Args:
        source, target: token ids (any lengths).
    Returns:
        for each target position j, the aligned source position, or -1 when the target
        token has no counterpart (an inserted or replaced word).
    """
    n, m = len(source), len(target)
    # lcs[i][j]: LCS length of source[i:] and target[j:] (suffixes, so the walk below
    # runs forwards and matches each token to its earliest partner on ties).
    lcs = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        row, below = lcs[i], lcs[i + 1]
        for j in range(m - 1, -1, -1):
            row[j] = below[j + 1] + 1 if source[i] == target[j] else max(below[j], row[j + 1])
    mapper = [-1] * m
    i = j = 0
    while i < n and j < m:
        if source[i] == target[j] and lcs[i][j] == lcs[i + 1][j + 1] + 1:
            mapper[j] = i
            i += 1
            j += 1
        elif lcs[i + 1][j] >= lcs[i][j + 1]:
            i += 1  # source token dropped
        else:
            j += 1  # target token inserted
    return mapper


def align_prompts(tokenizer, source_prompt: str, target_prompt: str) -> list[int]:
    """`align_tokens` on the padded token ids of two prompts. Returns a list of length 77."""
    return align_tokens(token_ids(tokenizer, source_prompt), token_ids(tokenizer, target_prompt))


def word_positions(tokenizer, prompt: str, words: str) -> list[int]:
    """Token positions of every occurrence of `words` (a word or phrase) in `prompt`.

    Positions index the padded sequence of `token_ids` (0 is BOS).

    Raises:
        ConfigError: the words do not occur in the prompt.
    """
    needle = list(tokenizer(words, add_special_tokens=False).input_ids)
    ids = token_ids(tokenizer, prompt)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    found: list[int] = []
    if needle:
        for start in range(1, len(ids) - len(needle) + 1):
            if ids[start : start + len(needle)] == needle and not special.intersection(needle):
                found.extend(range(start, start + len(needle)))
    if not found:
        raise ConfigError(f"{words!r} does not occur in the prompt {prompt!r} (after truncation to 75 tokens)")
    return sorted(set(found))


def reweighting(tokenizer, prompt: str, weights) -> list[float]:
    """Prompt-to-Prompt attention re-weighting of target words (Hertz et al., Sec. 3.2).

    Args:
        weights: (word or phrase, factor) pairs; the cross-attention columns of those
            tokens are multiplied by the factor during fusion.
    Returns:
        77 factors (1 for tokens not named).
    """
    factors = [1.0] * tokenizer.model_max_length
    for words, value in weights:
        for pos in word_positions(tokenizer, prompt, words):
            factors[pos] = float(value)
    return factors
