"""The token ids and logprobs a request asked to see, gathered on the coordinator and
formatted the way each endpoint reports them. Pure (no torch, no I/O).

/v1/completions uses OpenAI's legacy shape, per token: ``tokens``, ``token_logprobs``,
``top_logprobs`` (a {token: logprob} object holding the k best and the sampled token, so k or
k + 1 entries) and ``text_offset`` (where each token's text starts, counting the token
strings before it). Chat uses ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``
with the k best alternatives, best first. ``bytes`` are the token's own bytes (a token may
hold part of a UTF-8 character; its ``token`` string then shows U+FFFD).
"""

from __future__ import annotations

from typing import Any, Callable

from ascendra import messages as m

# What JSON gets for a log-probability of -inf (or NaN): vLLM's stand-in.
LOGPROB_FLOOR = -9999.0


def _finite(lp: float) -> float:
    return lp if lp > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN compares False: floored too


class TokenLog:
    """Output ids and (when asked) logprobs of one request; ``take`` hands out what is new."""

    __slots__ = ("want_ids", "num_top", "chat", "_piece", "_as_ids", "ids", "lps", "top_ids", "top_lps",
                 "_sent", "_offset")

    def __init__(self, want_ids: bool, num_top: int | None, chat: bool, piece: Callable[[int], bytes],
                 tokens_as_ids: bool = False) -> None:
        self.want_ids = want_ids
        self.num_top = num_top  # None: no logprobs
        self.chat = chat
        self._piece = piece  # token id -> its bytes, special tokens included
        self._as_ids = tokens_as_ids
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_lps: list[list[float]] = []
        self._sent = 0  # tokens already in a chunk (streaming)
        self._offset = 0  # text_offset of the next token handed out

    def add(self, out: m.RequestOutput) -> None:
        self.ids.extend(out.new_token_ids)
        k = self.num_top
        if k is None:
            return
        self.lps.extend(out.logprobs)
        for j in range(len(out.logprobs)):
            self.top_ids.append(out.top_token_ids[j * k:(j + 1) * k])
            self.top_lps.append(out.top_logprobs[j * k:(j + 1) * k])

    @property
    def pending(self) -> bool:
        return len(self.ids) > self._sent

    def take(self) -> tuple[Any, list[int] | None]:
        """(logprobs object, token ids) of the tokens since the last call; None for what was not asked."""
        start, self._sent = self._sent, len(self.ids)
        return self._fields(start, self._sent)

    def all(self) -> tuple[Any, list[int] | None]:
        """The same for the whole output (non-streaming)."""
        self._offset = 0
        return self._fields(0, len(self.ids))

    def _fields(self, start: int, end: int) -> tuple[Any, list[int] | None]:
        ids = self.ids[start:end] if self.want_ids else None
        if self.num_top is None:
            return None, ids
        end = min(end, len(self.lps))  # a token without a report (never from a real worker) is left out
        return (self._chat_logprobs(start, end) if self.chat else self._legacy_logprobs(start, end)), ids

    def _token(self, tid: int) -> tuple[str, bytes]:
        raw = self._piece(tid)
        text = f"token_id:{tid}" if self._as_ids else raw.decode("utf-8", errors="replace")
        return text, raw

    def _legacy_logprobs(self, start: int, end: int) -> dict[str, Any]:
        tokens: list[str] = []
        token_lps: list[float] = []
        tops: list[dict[str, float]] = []
        offsets: list[int] = []
        for i in range(start, end):
            text, _ = self._token(self.ids[i])
            lp = _finite(self.lps[i])
            top = {self._token(t)[0]: _finite(v) for t, v in zip(self.top_ids[i], self.top_lps[i])}
            top.setdefault(text, lp)  # the sampled token is always there, as OpenAI's legacy API has it
            tokens.append(text)
            token_lps.append(lp)
            tops.append(top)
            offsets.append(self._offset)
            self._offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, start: int, end: int) -> dict[str, Any]:
        content = []
        for i in range(start, end):
            text, raw = self._token(self.ids[i])
            alts = []
            for t, v in zip(self.top_ids[i], self.top_lps[i]):
                alt_text, alt_raw = self._token(t)
                alts.append({"token": alt_text, "logprob": _finite(v), "bytes": list(alt_raw)})
            content.append({"token": text, "logprob": _finite(self.lps[i]), "bytes": list(raw),
                            "top_logprobs": alts})
        return {"content": content}
