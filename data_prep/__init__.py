"""Corpus preparation: SentencePiece tokenizers and sharded token binaries (the ds_mtp.data format).

Commands (``ds-mtp prep ...``, ``ds-mtp-prep ...`` or ``python -m data_prep ...``): ``tokenizer``,
``shard``, ``verify``, ``inspect`` and ``stdlib-corpus``. See docs/pretraining.md.
"""
