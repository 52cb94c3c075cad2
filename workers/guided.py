"""Structured output on the worker: each guided request follows an outlines-core ``Guide``, and
every step masks its logits row to the tokens that keep its output matchable by its regex.

The regex comes in ``SamplingParams.guided_regex`` (the coordinator builds it from the request's
``response_format`` / ``guided_*`` field, ``ascendra/structured.py``). Its ``Index`` (the regex's
automaton over this model's vocabulary) is compiled once per distinct regex and kept in a small
LRU: 50-200 ms for typical JSON schemas on SmolLM2's 49k tokens, and outlines-core releases the GIL
meanwhile. A request's guide is built when it first samples, by replaying the tokens it already
has, so a request that arrives mid-generation (escalated with its KV, or resumed) continues from
the same automaton state it left.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from outlines_core import Guide, Index, Vocabulary

from ascendra.sequence import Sequence

# Distinct regexes whose compiled index a worker keeps (a JSON schema's is ~0.3 MB).
INDEX_CACHE_SIZE = 32


class GuideError(ValueError):
    """A guided request cannot go on (its regex does not fit this vocabulary, or nothing is left
    that it allows): the request ends with this error, its batch-mates go on."""


class Guides:
    def __init__(self, tokenizer_path: str | None, eos_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.eos_token_ids = eos_token_ids
        self._vocab: Vocabulary | None = None
        self._vocab_size = 0  # tokens the mask covers (the tokenizer's; logits may be padded past it)
        self._indexes: OrderedDict[str, Index] = OrderedDict()
        self._guides: dict[str, Guide] = {}

    # ---- vocabulary and indexes
    def _vocabulary(self) -> Vocabulary:
        if self._vocab is None:
            if self.tokenizer_path is None:
                raise GuideError("structured output needs a model with a tokenizer")
            from transformers import AutoTokenizer

            from ascendra.detokenizer import DetokenizerFactory

            tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
            table = DetokenizerFactory(tok).table  # each token's bytes, for byte-level BPE vocabularies
            if table is None:
                raise GuideError("structured output needs a byte-level BPE tokenizer (Llama 3, Qwen2, SmolLM2)")
            special = set(tok.all_special_ids)
            by_bytes: dict[bytes, list[int]] = {}
            for token_id, piece in enumerate(table):
                if piece and token_id not in special:
                    by_bytes.setdefault(piece, []).append(token_id)
            eos = tok.eos_token_id if tok.eos_token_id in self.eos_token_ids else self.eos_token_ids[0]
            self._vocab = Vocabulary(eos, by_bytes)
            self._vocab_size = len(table)
        return self._vocab

    def _index(self, regex: str) -> Index:
        index = self._indexes.get(regex)
        if index is not None:
            self._indexes.move_to_end(regex)
            return index
        try:
            index = Index(regex, self._vocabulary())
        except ValueError as e:
            raise GuideError(f"structured output cannot be served with this model's vocabulary: {e}") from None
        self._indexes[regex] = index
        if len(self._indexes) > INDEX_CACHE_SIZE:
            self._indexes.popitem(last=False)
        return index

    # ---- per request
    def guide(self, seq: Sequence) -> Guide:
        g = self._guides.get(seq.request_id)
        if g is None:
            g = Guide(self._index(seq.sampling.guided_regex))
            for token in seq.token_ids[seq.num_prompt_tokens:]:  # tokens it has already (moved or resumed)
                self._advance(g, token)
            self._guides[seq.request_id] = g
        return g

    def forget(self, request_id: str) -> None:
        self._guides.pop(request_id, None)

    def clear(self) -> None:
        self._guides.clear()

    def _advance(self, g: Guide, token: int) -> None:
        if token in self.eos_token_ids:
            return  # the request ends on it
        try:
            g.advance(token, False)
        except ValueError as e:
            raise GuideError(f"token {token} leaves the structured output's language: {e}") from None

    # ---- one step
    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Sequence]]) -> dict[int, GuideError]:
        """Set every token a guided row's guide does not allow to -inf, in place. Returns the rows
        that cannot go on, with why."""
        errors: dict[int, GuideError] = {}
        usable = []
        for row, seq in rows:
            try:
                usable.append((row, self.guide(seq)))
            except GuideError as e:
                errors[row] = e
        if not usable:
            return errors
        words = (self._vocab_size + 31) // 32  # the vocabulary is built once a guide exists
        bits = torch.zeros(len(usable), words, dtype=torch.int32)
        for k, (_, g) in enumerate(usable):
            g.write_mask_into(bits[k].data_ptr(), words, 4)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(len(usable), -1)
        vocab = logits.shape[1]
        if allowed.shape[1] < vocab:  # padded logits past the tokenizer's vocabulary: never allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]))
        allowed = allowed[:, :vocab]
        for k, (_, g) in enumerate(usable):
            if g.is_finished():  # the structure is complete: any end-of-sequence token may end it
                allowed[k, self.eos_token_ids] = True
        for k in (~allowed.any(dim=1)).nonzero().flatten().tolist():
            errors[usable[k][0]] = GuideError("structured output: no token can continue the output")
        rows_t = torch.tensor([row for row, _ in usable], device=logits.device)
        # One host -> device copy for every guided row of the step; a row with nothing left errors
        # above, and its -inf row is never sampled from.
        logits[rows_t] = logits[rows_t].masked_fill(~allowed.to(logits.device), float("-inf"))
        return errors

    def advance(self, seq: Sequence, token: int) -> GuideError | None:
        try:
            self._advance(self.guide(seq), token)
        except GuideError as e:
            return e
        return None
