"""A BERT of MiniLM's shape with random weights, built offline, for machines without MiniLM.

Throughput depends on a model's shapes (layers, heads, hidden size) and on the window lengths,
not on its weights, so where the package with MiniLM's weights is missing (a lent GPU machine,
say) a benchmark can time this stand-in instead. Its WordPiece vocabulary is learnt by the
``tokenizers`` library from the benchmark's own text (the Python help topics), lower-cased
like MiniLM's, so texts cut into about as many tokens as MiniLM cuts them into. Nothing is
downloaded.

    python benchmarks/random_model.py /tmp/minilm-shape      # build a folder, print its facts
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pipelines.jobs.demo import paragraphs

#: Shapes by name: ``minilm-shape`` is all-MiniLM-L6-v2's (6 layers, 12 heads, 384 wide).
SHAPES: dict[str, dict[str, int]] = {
    "minilm-shape": {"num_hidden_layers": 6, "num_attention_heads": 12, "hidden_size": 384,
                     "intermediate_size": 1536, "max_position_embeddings": 512},
}
VOCAB_SIZE = 30522  # MiniLM's; the help topics may yield fewer pieces
SEED = 1234
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE,
                        max_length: int = 512):
    """A lower-casing BERT WordPiece tokenizer ([CLS] A [SEP] B [SEP]) learnt from ``texts``."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False))
    cls, sep = (("[CLS]", tokenizer.token_to_id("[CLS]")),
                ("[SEP]", tokenizer.token_to_id("[SEP]")))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[cls, sep])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                   pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]", model_max_length=max_length,
                                   model_input_names=["input_ids", "token_type_ids",
                                                      "attention_mask"])


def build(folder: str | Path, shape: str = "minilm-shape") -> Path:
    """Write a random BERT of ``shape`` (``SHAPES``) and its tokenizer into ``folder``; a
    folder ``headscope`` (and ``--model``) loads like any other."""
    from transformers import BertConfig, BertModel

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use {', '.join(SHAPES)}")
    folder = Path(folder)
    sizes = SHAPES[shape]
    tokenizer = wordpiece_tokenizer([row["text"] for row in paragraphs()],
                                    max_length=sizes["max_position_embeddings"])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        **sizes)
    BertModel(config).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    path = build(sys.argv[1])
    print(f"random {', '.join(f'{k}={v}' for k, v in SHAPES['minilm-shape'].items())} "
          f"→ {path}")
