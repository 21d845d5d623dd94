"""SentencePiece tokenizers trained, loaded and applied the way upstream does for sp1024."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from core.atomic import atomic_write_bytes
from core.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SP_DEFAULT_MAX_SENTENCE_BYTES = 4192


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_model_path: str | os.PathLike) -> Path:
    """Train a BPE SentencePiece model with upstream's sp1024 settings; write .model and .vocab atomically.

    Each text is one training "sentence", as upstream feeds whole documents (stripped, NULs made spaces).
    Unlike upstream we raise max_sentence_length to the longest document: SentencePiece silently skips
    longer sentences, which for a small corpus of long documents would drop most of it.
    Deterministic: one thread, no sentence sampling, and no output path recorded in the model; two trainings
    on the same texts give identical .model bytes (tests/test_bpb.py checks this).
    """
    out_model_path = Path(out_model_path)
    if out_model_path.suffix != ".model":
        raise UserError(f"tokenizer output {out_model_path}: expected a file name ending in .model")
    if not 260 < vocab_size <= 2**16:
        # byte_fallback needs 256 byte pieces plus pad/bos/eos/unk; shards store ids as uint16
        raise UserError(f"vocab size {vocab_size}: expected 260 < vocab_size <= 65536 (byte fallback uses 260 ids)")
    sentences = [t.replace("\x00", " ").strip() for t in texts]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise UserError(f"tokenizer {out_model_path}: no non-empty training text")
    longest = max(len(s.encode("utf-8")) for s in sentences)
    model = io.BytesIO()
    try:
        _train(sentences, model, vocab_size, longest)
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenizer {out_model_path}: SentencePiece training failed ({reason})") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    # The same "piece<TAB>score" lines SentencePiece writes itself (checked byte-for-byte against its .vocab).
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size()))
    atomic_write_bytes(out_model_path, model.getvalue())
    atomic_write_bytes(out_model_path.with_suffix(".vocab"), vocab.encode("utf-8"))
    return out_model_path


def _train(sentences: list[str], model: io.BytesIO, vocab_size: int, longest: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,  # not model_prefix: the prefix path would be stored in the model, making bytes differ
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.999,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        hard_vocab_limit=False,
        num_threads=1,
        input_sentence_size=0,
        max_sentence_length=max(SP_DEFAULT_MAX_SENTENCE_BYTES, longest + 1),
        minloglevel=2,  # silence SentencePiece's per-step log on stderr
    )


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise UserError(f"tokenizer {path}: not a readable SentencePiece model ({str(e).splitlines()[0]})") from None
    return sp


def encode_documents(sp: spm.SentencePieceProcessor, docs: Iterable[str]) -> list[np.ndarray]:
    """Token ids per document, each prefixed with BOS (id 1) and no EOS, as upstream's exporter."""
    docs = list(docs)
    bos = int(sp.bos_id())
    if bos < 0:
        raise UserError("tokenizer has no BOS piece; expected bos_id 1 as upstream's sp models")
    encoded = sp.encode(docs, out_type=int) if docs else []
    out = []
    for ids in encoded:
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[0] = bos
        arr[1:] = ids
        out.append(arr)
    return out
