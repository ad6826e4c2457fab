"""The ``ds-mtp prep`` subcommands (also ``ds-mtp-prep`` and ``python -m data_prep``, both through ds_mtp.cli):
each parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import sys

from ds_mtp.errors import UserError


def cmd_tokenizer(args) -> int:
    from data_prep.tokenizer import adopt_tokenizer, train_tokenizer

    if args.adopt:
        if args.input or args.hf:
            raise UserError("--adopt takes an existing model; do not also give --input/--hf")
        adopt_tokenizer(args.adopt, args.out, overwrite=args.overwrite)
    else:
        train_tokenizer(args.input or [], args.out, vocab_size=args.vocab_size, model_type=args.type,
                        sample_docs=args.sample_docs, character_coverage=args.character_coverage, hf=args.hf,
                        hf_split=args.split, field=args.field, doc_per_file=args.doc_per_file,
                        max_doc_chars=args.max_doc_chars, seed=args.seed, threads=args.threads,
                        overwrite=args.overwrite)
    return 0


def cmd_shard(args) -> int:
    from data_prep.shard import shard_corpus

    shard_corpus(args.input or [], args.tokenizer, args.out, hf=args.hf, hf_split=args.split, field=args.field,
                 doc_per_file=args.doc_per_file, workers=args.workers, shard_tokens=args.shard_tokens,
                 val_fraction=args.val_fraction, dedup=args.dedup, max_doc_chars=args.max_doc_chars,
                 strict=args.strict, overwrite=args.overwrite, resume=args.resume, progress=not args.no_progress,
                 unit_bytes=args.unit_bytes, command=list(sys.argv))
    return 0


def cmd_verify(args) -> int:
    from data_prep.verify import verify_data

    return 1 if verify_data(args.data) else 0


def cmd_inspect(args) -> int:
    from data_prep.verify import inspect_data

    inspect_data(args.data, shard=args.shard, split=args.split, count=args.n, tokenizer=args.tokenizer,
                 max_chars=args.max_chars, show_ids=args.ids)
    return 0


def cmd_stdlib_corpus(args) -> int:
    from data_prep.stdlib_corpus import write_stdlib_corpus

    write_stdlib_corpus(args.out, min_chars=args.min_chars, max_docs=args.max_docs)
    return 0


def _corpus_args(p) -> None:
    p.add_argument("--input", action="append", metavar="FILE_OR_DIR",
                   help="a .txt, .jsonl, .jsonl.gz or .parquet file, or a directory of them (repeatable)")
    p.add_argument("--hf", default="", metavar="NAME_OR_PATH",
                   help="a datasets dataset: a save_to_disk directory, a local dataset directory or a cached hub name")
    p.add_argument("--split", default="train", help="split of the --hf dataset")
    p.add_argument("--field", default="text", help="text field of .jsonl records and column of .parquet / --hf")
    p.add_argument("--doc-per-file", action="store_true", help=".txt files hold one document each (not one per line)")
    p.add_argument("--max-doc-chars", type=int, default=1_000_000,
                   help="skip (and count) documents longer than this many characters (0 = no limit)")


def add_prep_commands(parser: argparse.ArgumentParser) -> None:
    """Attach the prep subcommands to ``parser`` (used by both ``ds-mtp prep`` and ``ds-mtp-prep``)."""
    sub = parser.add_subparsers(dest="prep_command", required=True)

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer (or adopt a .model)")
    _corpus_args(p)
    p.add_argument("--out", required=True, help="tokenizer directory (gets tokenizer.model and tokenizer_info.json)")
    p.add_argument("--adopt", default="", metavar="MODEL", help="adopt this existing SentencePiece .model instead")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--type", default="bpe", help="bpe or unigram")
    p.add_argument("--sample-docs", type=int, default=100_000,
                   help="train on this many documents, chosen deterministically by content hash")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="SentencePiece trainer threads (0 = all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer.model in --out")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("shard", help="tokenize a corpus into train/val token shards")
    _corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or .model file")
    p.add_argument("--out", required=True, help="data directory for the shards and manifest.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="start a new shard after about this many tokens")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents (chosen by content hash) that go to the 'val' split")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (counted as 'duplicate')")
    p.add_argument("--strict", action="store_true", help="stop with exit code 2 at the first bad record")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--resume", action="store_true",
                   help="require an interrupted run in --out to continue (rerunning the same command resumes anyway)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--unit-bytes", type=int, default=1 << 20,
                   help="input bytes per work unit of line-based files (how work is cut, never what is written)")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("verify", help="re-check every shard (hashes, index, id range); exit 1 on any fault")
    p.add_argument("data", help="data directory")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("inspect", help="decode and print the first documents of a shard")
    p.add_argument("data", help="data directory")
    p.add_argument("--shard", default="", help="shard name, e.g. val_00000 (default: the split's first)")
    p.add_argument("--split", default="train")
    p.add_argument("-n", type=int, default=3, help="number of documents")
    p.add_argument("--tokenizer", default="", help="tokenizer (default: the copy in the data directory)")
    p.add_argument("--max-chars", type=int, default=2000, help="cut each printed document after this many characters")
    p.add_argument("--ids", action="store_true", help="also print the token ids")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("stdlib-corpus", help="write the installed Python standard library's docstrings as .jsonl")
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--min-chars", type=int, default=200, help="skip docstrings shorter than this")
    p.add_argument("--max-docs", type=int, default=0, help="stop after this many documents (0 = all)")
    p.set_defaults(func=cmd_stdlib_corpus)
