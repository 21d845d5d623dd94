"""Bits per byte, counted exactly as upstream: bytes come from token lookup tables, not from decoding.

For a scored target token y after token p: bytes(y) = base_bytes[y] + (has_leading_space[y] and not
is_boundary[p]). The leading "▁" of a piece is one space byte except right after a boundary token
(BOS and the other control/unknown/unused tokens), where the text had no space.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from core.errors import UserError


@dataclass(frozen=True)
class ByteLuts:
    base_bytes: np.ndarray  # int16, UTF-8 bytes of the piece without its leading "▁"
    has_leading_space: np.ndarray  # bool
    is_boundary: np.ndarray  # bool, True for control/unknown/unused ids and ids beyond the tokenizer

    @classmethod
    def from_sentencepiece(cls, sp, model_vocab_size: int = 0) -> "ByteLuts":
        sp_vocab = int(sp.vocab_size())
        # The model may have more embedding rows than the tokenizer has pieces; those ids never occur
        # in the data but must index safely.
        size = max(sp_vocab, int(model_vocab_size))
        base_bytes = np.zeros(size, dtype=np.int16)
        has_leading_space = np.zeros(size, dtype=np.bool_)
        is_boundary = np.ones(size, dtype=np.bool_)
        for i in range(sp_vocab):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            is_boundary[i] = False
            if sp.is_byte(i):
                base_bytes[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith("\u2581"):
                has_leading_space[i] = True
                piece = piece[1:]
            base_bytes[i] = len(piece.encode("utf-8"))
        return cls(base_bytes, has_leading_space, is_boundary)


def build_byte_luts(sp, model_vocab_size: int = 0) -> ByteLuts:
    return ByteLuts.from_sentencepiece(sp, model_vocab_size)


def count_bytes(prev_ids, tgt_ids, luts: ByteLuts) -> float:
    """Total UTF-8 bytes that the target tokens stand for (float64, as upstream's sums)."""
    prev = np.asarray(prev_ids, dtype=np.int64).reshape(-1)
    tgt = np.asarray(tgt_ids, dtype=np.int64).reshape(-1)
    per_token = luts.base_bytes[tgt].astype(np.int64) + (luts.has_leading_space[tgt] & ~luts.is_boundary[prev])
    return float(per_token.sum(dtype=np.float64))


def bpb_from_sums(loss_sum_nats: float, token_count: float, byte_count: float) -> tuple[float, float]:
    """(val_loss in nats per token, val_bpb) from float64 sums, in upstream's order of operations."""
    if token_count <= 0 or byte_count <= 0:
        raise ValueError(f"bpb needs positive token and byte counts, got {token_count} and {byte_count}")
    val_loss = float(np.float64(loss_sum_nats) / np.float64(token_count))
    bits_per_token = val_loss / math.log(2.0)
    tokens_per_byte = float(np.float64(token_count) / np.float64(byte_count))
    return val_loss, float(bits_per_token * tokens_per_byte)


def check_vocab(sp, model_vocab_size: int, tokenizer_path: str | os.PathLike) -> None:
    """A model must have an embedding row for every id the tokenizer can produce."""
    sp_vocab = int(sp.vocab_size())
    if sp_vocab > int(model_vocab_size):
        raise UserError(
            f"tokenizer {tokenizer_path} has vocab {sp_vocab} but model.vocab_size is {model_vocab_size}"
        )
