"""Qwen2 byte-level BPE tokenizer (transformers) plus BAGEL's special-token roles (spec 2.1-2.3).

BAGEL adds no BOS/EOS and uses no chat template: a text block is ``[<|im_start|>] + encode(text) +
[<|im_end|>]``. The four marker tokens are looked up by string, as the official loader does.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from .errors import CheckpointError

SPECIAL = {"bos_id": "<|im_start|>", "eos_id": "<|im_end|>",
           "start_of_image": "<|vision_start|>", "end_of_image": "<|vision_end|>"}


class BagelTokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        vocab = hf_tokenizer.get_vocab()
        for attr, tok in SPECIAL.items():
            if tok not in vocab:
                raise CheckpointError(f"tokenizer has no {tok} token; this is not a Qwen2/BAGEL tokenizer")
            setattr(self, attr, vocab[tok])

    @classmethod
    def from_folder(cls, folder: str | Path) -> "BagelTokenizer":
        folder = Path(folder)
        missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).exists()]
        if missing and not (folder / "tokenizer.json").exists():
            raise CheckpointError(f"{folder}: tokenizer files {missing} are missing; copy vocab.json, merges.txt "
                                  "and tokenizer_config.json from the BAGEL-7B-MoT release")
        from transformers import AutoTokenizer
        try:
            hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types for broken files
            raise CheckpointError(f"{folder}: the tokenizer files could not be read ({e})") from e
        return cls(hf)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added (NFC-normalised first, as the slow tokenizer does)."""
        return list(self.hf.encode(unicodedata.normalize("NFC", text), add_special_tokens=False))

    def text_block(self, text: str) -> list[int]:
        return [self.bos_id] + self.encode(text) + [self.eos_id]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False,
                              spaces_between_special_tokens=False)

    def answer_text(self, ids) -> str:
        """Text between the first <|im_start|> and the first <|im_end|> of decode(ids) (spec 10.1)."""
        s = self.decode(ids)
        start, end = SPECIAL["bos_id"], SPECIAL["eos_id"]
        s = s.split(end)[0]
        return s.split(start, 1)[1] if start in s else s
