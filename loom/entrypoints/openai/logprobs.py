"""Log-probabilities in OpenAI's two shapes, with each token's decoded text and raw bytes.

Byte-level BPE tokens (GPT-2 style, as SmolLM2 and Llama 3 use) map back to their exact bytes, so a token holding
half of a UTF-8 character reports its real bytes and ``"\\ufffd"`` as text; other tokenizers fall back to decode.
"""

from __future__ import annotations

import functools

from loom.tokenization import bytes_to_unicode

_BYTE_DECODER = {ch: b for b, ch in bytes_to_unicode().items()}


class TokenStrings:
    """Decoded text and bytes of single token ids, cached."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(ch in _BYTE_DECODER for ch in piece):
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="replace")

    # --- chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]} -----------------------------
    def chat_entries(self, token_ids: list[int], logprobs: list[dict[int, float]], top: int) -> list[dict]:
        return [self._chat_entry(t, lp, top) for t, lp in zip(token_ids, logprobs)]

    def _chat_entry(self, token_id: int, logprobs: dict[int, float], top: int) -> dict:
        ranked = sorted(logprobs.items(), key=lambda kv: -kv[1])[:top]
        return {
            **self._one(token_id, logprobs[token_id]),
            "top_logprobs": [self._one(t, lp) for t, lp in ranked],
        }

    def _one(self, token_id: int, logprob: float) -> dict:
        raw = self.bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}

    # --- completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} ------------------------------
    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float] | None], top: int,
                            text_offset: int = 0) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for token_id, lp in zip(token_ids, logprobs):
            text = self.text(token_id)
            tokens.append(text)
            if lp is None:  # an echoed prompt's first token: nothing scores it
                token_lps.append(None)
                tops.append(None)
            else:
                token_lps.append(max(lp[token_id], -9999.0))
                ranked = sorted(lp.items(), key=lambda kv: -kv[1])[:top]
                tops.append({self.text(t): max(v, -9999.0) for t, v in ranked} if top else None)
            offsets.append(text_offset)
            text_offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # --- vLLM's prompt_logprobs: [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...] --------------------
    def prompt_entries(self, token_ids: list[int], logprobs: list[dict[int, float] | None],
                       ranks: list[int | None], top: int) -> list[dict | None]:
        """Per prompt token: the token's own score and rank, then the ``top`` most likely tokens' (ranks 1..top);
        None for the first token."""
        out: list[dict | None] = []
        for token_id, lp, rank in zip(token_ids, logprobs, ranks):
            if lp is None:
                out.append(None)
                continue
            entry = {str(token_id): self._prompt_one(token_id, lp[token_id], rank)}
            for place, (t, v) in enumerate(sorted(lp.items(), key=lambda kv: -kv[1])[:top]):
                entry.setdefault(str(t), self._prompt_one(t, v, place + 1))
            out.append(entry)
        return out

    def _prompt_one(self, token_id: int, logprob: float, rank: int) -> dict:
        return {"logprob": max(logprob, -9999.0), "rank": rank, "decoded_token": self.text(token_id)}
