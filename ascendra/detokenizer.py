"""Incremental detokenisation and stop-string matching for the coordinator.

Two detokenizers share one interface (``feed(token_ids) -> str`` and ``flush() -> str``):

* ``ByteLevelDetokenizer`` for byte-level BPE tokenizers (GPT-2 style, SmolLM2, Llama 3,
  Qwen2): every token id maps to a fixed byte string, so decoding is a table lookup and an
  incremental UTF-8 decode. This is the hot path: about a microsecond per token.
* ``WindowDetokenizer`` for anything else (SentencePiece): decodes a short sliding window
  of ids with the tokenizer and emits the difference, holding back text that ends in an
  incomplete character.

``DetokenizerFactory`` picks one per tokenizer after checking the table against the
tokenizer's own ``decode`` on a sample.
"""

from __future__ import annotations

import codecs
import random
from typing import Any, Callable

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the printable-character alphabet byte-level BPE uses for raw bytes.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, a few
    others) are shifted to code points from 256 upwards, in byte order.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    kept = set(keep)
    table: dict[str, int] = {chr(b): b for b in keep}
    shift = 0
    for b in range(256):
        if b not in kept:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class ByteLevelDetokenizer:
    __slots__ = ("_table", "_utf8")

    def __init__(self, table: list[bytes]) -> None:
        self._table = table
        self._utf8 = _utf8_decoder(errors="replace")

    def feed(self, token_ids: list[int]) -> str:
        table = self._table
        n = len(table)
        if len(token_ids) == 1:
            t = token_ids[0]
            data = table[t] if 0 <= t < n else b""
        else:
            data = b"".join([table[t] if 0 <= t < n else b"" for t in token_ids])
        return self._utf8.decode(data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class WindowDetokenizer:
    """Generic incremental decode: decode(ids[prefix:]) minus decode(ids[prefix:read])."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read")

    def __init__(self, decode: Callable[[list[int]], str], prompt_tail: list[int]) -> None:
        self._decode = decode
        # A few prompt ids give the decoder left context (e.g. SentencePiece's leading space).
        self._ids = list(prompt_tail)
        self._prefix = 0
        self._read = len(self._ids)

    def feed(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # incomplete character: wait for more ids
        self._prefix = self._read
        self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class DetokenizerFactory:
    """Creates a per-request detokenizer for one tokenizer: special tokens skipped (the
    default) or kept (``skip_special_tokens: false``), and gives each token's own bytes."""

    _UNBUILT: Any = object()

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.table: list[bytes] | None = self._build_byte_table()
        self._keep_table: list[bytes] | None = self._UNBUILT  # built on first use

    @property
    def fast(self) -> bool:
        return self.table is not None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_keep(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    @property
    def keep_table(self) -> list[bytes] | None:
        """The byte table with special tokens as their text (None: not a byte-level vocabulary)."""
        if self._keep_table is self._UNBUILT:
            self._keep_table = self._build_byte_table(keep_special=True) if self.table is not None else None
        return self._keep_table

    def piece(self, token_id: int) -> bytes:
        """One token's bytes as the tokenizer writes it, special tokens included (for logprobs)."""
        table = self.keep_table
        if table is not None:
            return table[token_id] if 0 <= token_id < len(table) else b""
        return self._decode_keep([token_id]).encode()

    def _build_byte_table(self, keep_special: bool = False) -> list[bytes] | None:
        tok = self._tokenizer
        try:
            from tokenizers import decoders

            backend = tok.backend_tokenizer
            if not isinstance(backend.decoder, decoders.ByteLevel):
                return None
            if getattr(tok, "clean_up_tokenization_spaces", False):
                return None  # decode() rewrites spaces; the table would not match
            vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
            added = {i: t for i, t in tok.added_tokens_decoder.items()}
        except Exception:
            return None
        alphabet = _byte_level_alphabet()
        size = max(max(vocab.values(), default=-1) + 1, len(tok))
        table = [b""] * size
        for piece, i in vocab.items():
            if i in added:
                skip = not keep_special and (added[i].special or i in self._special)
                table[i] = b"" if skip else added[i].content.encode()
                continue
            try:
                table[i] = bytes(alphabet[c] for c in piece)
            except KeyError:
                return None  # not a byte-level vocabulary after all
        if not keep_special:
            for i in self._special:
                if 0 <= i < size:
                    table[i] = b""
        if not self._verify(table, self._decode_keep if keep_special else self._decode):
            return None
        return table

    def _verify(self, table: list[bytes], decode: Callable[[list[int]], str]) -> bool:
        """Check the table reproduces tokenizer.decode on random and real sequences."""
        rng = random.Random(0)
        n = len(table)
        samples = [[rng.randrange(n) for _ in range(rng.randint(1, 24))] for _ in range(64)]
        samples.append(self._tokenizer.encode("Hello, world! Ünïcödé 日本語 🙂  tabs\tand\nnewlines", add_special_tokens=False))
        specials = sorted(i for i in self._special if 0 <= i < n)
        if specials:  # every special token, between ordinary ones
            samples.append([x for i in specials for x in (samples[-1][0], i)])
        for ids in samples:
            want = decode(ids)
            got = b"".join(table[i] for i in ids).decode("utf-8", errors="replace")
            if got != want:
                return False
        return True

    def new(self, prompt_ids: list[int], skip_special_tokens: bool = True) -> ByteLevelDetokenizer | WindowDetokenizer:
        table = self.table if skip_special_tokens else self.keep_table
        if table is not None:
            return ByteLevelDetokenizer(table)
        return WindowDetokenizer(self._decode if skip_special_tokens else self._decode_keep, prompt_ids[-6:])


class StopChecker:
    """Finds stop strings in streamed text, including matches split across tokens.

    Text that could still become the start of a stop string is held back, so the
    client never sees a partial stop string. Per token the cost is one ``find`` per stop
    string over the held text plus the new text, and a set lookup per held-back
    candidate: it grows with the longest stop string, not with the product of their
    number and length (the API bounds both).
    """

    __slots__ = ("_stops", "_held", "_prefixes", "_firsts", "_longest", "_include", "_seen")

    def __init__(self, stops: list[str], include: bool = False) -> None:
        self._stops = list(dict.fromkeys(s for s in stops if s))
        self._held = ""
        # include_stop_str_in_output: the text keeps the stop string, so nothing is held back;
        # the last emitted characters are remembered to find a stop split across tokens.
        self._include = include
        self._seen = ""
        # Every proper prefix of every stop string: what the end of the text may be holding.
        self._prefixes = {s[:k] for s in self._stops for k in range(1, len(s))}
        self._firsts = {s[0] for s in self._stops}
        self._longest = max((len(s) for s in self._stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, matched). On a match the text ends before the stop
        (or right after it, with ``include``)."""
        if self._include:
            return self._feed_including(text)
        buf = self._held + text if self._held else text
        if not buf:
            return "", False
        best = -1
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (best == -1 or i < best):
                best = i
        if best != -1:
            self._held = ""
            return buf[:best], True
        keep = 0
        prefixes, firsts, n = self._prefixes, self._firsts, len(buf)
        # Longest suffix of the buffer that is a proper prefix of some stop string.
        for k in range(min(self._longest - 1, n), 0, -1):
            if buf[n - k] in firsts and buf[n - k:] in prefixes:
                keep = k
                break
        if keep:
            self._held = buf[-keep:]
            return buf[:-keep], False
        self._held = ""
        return buf, False

    def _feed_including(self, text: str) -> tuple[str, bool]:
        seen = self._seen
        buf = seen + text
        end = -1  # where the earliest-ending stop string ends in buf
        for s in self._stops:
            i = buf.find(s)
            if i != -1 and (end == -1 or i + len(s) < end):
                end = i + len(s)
        if end != -1:
            return buf[len(seen):end], True
        self._seen = buf[-(self._longest - 1):] if self._longest > 1 else ""
        return text, False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
