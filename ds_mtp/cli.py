"""The ``ds-mtp`` command: subcommands that parse arguments and call one function each."""

from __future__ import annotations

import argparse
import os
import sys

from ds_mtp.errors import UserError


def cmd_train(args) -> int:
    from ds_mtp.config import load_config
    from ds_mtp.launch import inside_launch, is_launch_leader, run_local
    from ds_mtp.train import prepare_run, train

    if args.pipeline_stages is not None:  # the flag is the override train.pipeline_stages=P
        args.overrides = [*args.overrides, f"train.pipeline_stages={args.pipeline_stages}"]
    cfg = load_config(args.config, args.overrides)
    if inside_launch():
        if is_launch_leader() and not os.environ.get("DS_MTP_PREPARED"):
            prepare_run(cfg, args.run_dir, args.resume)
        train(cfg, args.run_dir, resume=args.resume)
        return 0
    if cfg.train.pipeline_stages > 1:
        from ds_mtp.pipeline import check_layout

        check_layout(cfg, max(1, args.nproc))
    prepare_run(cfg, args.run_dir, args.resume)
    if args.nproc and args.nproc > 1:
        forwarded = ["train", "--run-dir", args.run_dir, *(["--config", args.config] if args.config else []),
                     *(["--resume"] if args.resume else []), *args.overrides]
        return run_local(args.nproc, forwarded)
    train(cfg, args.run_dir, resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    from ds_mtp.demo import run_demo

    run_demo(args.run_dir, steps=args.steps, nproc=args.nproc, seed=args.seed)
    return 0


def cmd_export(args) -> int:
    from ds_mtp.export import export_checkpoint

    if args.run_dir and args.run_dir_option and args.run_dir != args.run_dir_option:
        raise UserError(f"two run directories given ({args.run_dir} and --run-dir {args.run_dir_option})")
    run_dir = args.run_dir or args.run_dir_option
    if not run_dir:
        raise UserError("no run directory: ds-mtp export RUN_DIR [--tag stepN] --out DIR")
    out = export_checkpoint(run_dir, args.out, tag=args.tag, overwrite=args.overwrite)
    print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-mtp", description="LSE-MTP pretraining on DeepSpeed")
    # The deepspeed launcher passes --local_rank=N to each rank (the rank is also in LOCAL_RANK).
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (ZeRO-3 by default) on token shards")
    p.add_argument("--config", help="run config (YAML or JSON)")
    p.add_argument("--run-dir", required=True, help="where metrics, TensorBoard logs, checkpoints and the model go")
    p.add_argument("--nproc", type=int, default=0, help="start N ranks on this node (GPUs, or CPU processes)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="P",
                   help="pipeline-parallel stages (= train.pipeline_stages=P; ranks = P x data-parallel replicas)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=200")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="consolidate a ZeRO or pipeline checkpoint into model.safetensors + config.json")
    p.add_argument("run_dir", nargs="?", help="the training run directory")
    p.add_argument("--run-dir", dest="run_dir_option", help=argparse.SUPPRESS)
    p.add_argument("--tag", help="checkpoint tag, e.g. step200 (default: the latest)")
    p.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="NTP vs MTP vs LSE-MTP on the paper's USG world, evaluated on held-out pairs")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=0, help="training steps per method (0 = the demo's default)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
