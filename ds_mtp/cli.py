"""The ``ds-mtp`` command: subcommands that parse arguments and call one function each."""

from __future__ import annotations

import argparse
import os
import sys

from ds_mtp.errors import UserError


# Flags that are spellings of teacher.* overrides (docs/teacher.md); an explicit override wins.
TEACHER_FLAGS = {"lse_target": "source", "teacher_ranks": "ranks", "teacher_layer": "layer",
                 "teacher_stride": "stride", "teacher_timeout": "timeout"}


def cmd_train(args) -> int:
    """Train here (one process, or one rank of a launch that started us), or start --nproc ranks on this node
    through the same path as ``ds-mtp launch``."""
    from ds_mtp.config import load_config
    from ds_mtp.ranks import inside_launch, is_launch_leader
    from ds_mtp.run_dir import RunDir, RunLock
    from ds_mtp.train import prepare_run, train

    overrides = [*(f"teacher.{field}={getattr(args, flag)}" for flag, field in TEACHER_FLAGS.items()
                   if getattr(args, flag) is not None), *args.overrides]
    if args.pipeline_stages is not None:  # the flag is the override train.pipeline_stages=P
        overrides.append(f"train.pipeline_stages={args.pipeline_stages}")
    if args.data:
        overrides.append(f"data.path={args.data}")
    if args.nproc > 1 and not inside_launch():
        from ds_mtp.ranks import free_port
        from launcher import LaunchOptions, launch

        # A port of its own: two `train --nproc` on one machine must not both take the default 29500.
        return launch(LaunchOptions(run_dir=args.run_dir, config=args.config, overrides=overrides, nproc=args.nproc,
                                    master_port=free_port(), resume=args.resume))
    cfg = load_config(args.config, overrides)
    launched = inside_launch()  # before train(): it writes this process's rank environment
    if launched and (os.environ.get("DS_MTP_PREPARED") or not is_launch_leader()):
        train(cfg, args.run_dir, resume=args.resume)  # the launching process checked RUN_DIR and holds its lock
        return 0
    paths = RunDir(args.run_dir)
    with RunLock(paths):
        if not launched:
            from ds_mtp.ranks import layout_of

            layout_of(cfg, 1)
            if args.resume and paths.has_checkpoint():  # saved on more ranks? convert it, keep its global batch
                from ds_mtp.checkpoint import resume_tag
                from ds_mtp.universal import prepare_resize

                prepare_resize(cfg, paths.checkpoints, 1, resume_tag(paths)[0])
        cfg = prepare_run(cfg, args.run_dir, args.resume)
        try:
            train(cfg, args.run_dir, resume=args.resume)
        finally:  # a process started by hand was the whole launch: its DeepSpeed all-reduce buffer goes with it
            from ds_mtp.shm_buffers import remove_launch_buffers

            if not launched and os.environ.get("MASTER_PORT", "").isdigit():
                remove_launch_buffers(int(os.environ["MASTER_PORT"]))
    return 0


def cmd_launch(args) -> int:
    from launcher import LaunchOptions, launch

    options = {k: v for k, v in vars(args).items() if k in LaunchOptions.__dataclass_fields__}
    return launch(LaunchOptions(**options))


def cmd_demo(args) -> int:
    from ds_mtp.experiments.demo import run_demo

    run_demo(args.run_dir, steps=args.steps, nproc=args.nproc, seed=args.seed)
    return 0


def cmd_reproduce(args) -> int:
    from ds_mtp.experiments.reproduce import parse_methods, reproduce

    command = (f"ds-mtp reproduce --world {args.world} --methods {args.methods} --seeds {args.seeds} --scale "
               f"{args.scale} --out {args.out} --k {args.k} --world-seed {args.world_seed}"
               + (f" --nproc {args.nproc}" if args.nproc else "") + (" --resume" if args.resume else "")
               + "".join(f" {o}" for o in args.overrides))
    reproduce(args.world, parse_methods(args.methods), args.seeds, args.scale, args.out, k=args.k, nproc=args.nproc,
              resume=args.resume, overrides=args.overrides, world_seed=args.world_seed, command=command)
    return 0


def cmd_export(args) -> int:
    from ds_mtp.export import export_checkpoint

    if args.run_dir and args.run_dir_option and args.run_dir != args.run_dir_option:
        raise UserError(f"two run directories given ({args.run_dir} and --run-dir {args.run_dir_option})")
    run_dir = args.run_dir or args.run_dir_option
    if not run_dir:
        raise UserError("no run directory: ds-mtp export RUN_DIR [--tag stepN] --out DIR")
    if args.format == "hf":
        from ds_mtp.hf_export import export_hf

        out = export_hf(run_dir, args.out, tag=args.tag, overwrite=args.overwrite, tokenizer_path=args.tokenizer)
        print(f"exported the Hugging Face layout to {out} (transformers.AutoModelForCausalLM / AutoTokenizer)")
        return 0
    out = export_checkpoint(run_dir, args.out, tag=args.tag, overwrite=args.overwrite)
    print(f"exported {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


def cmd_generate(args) -> int:
    from ds_mtp.run_dir import resolve_model_dir
    from ds_mtp.text import generate_text, load_model_dir, read_prompts
    from ds_mtp.tokenizers import find_tokenizer

    prompts = read_prompts(args.prompt, args.prompts)
    model, config = load_model_dir(args.model, args.device)
    tokenizer = find_tokenizer(resolve_model_dir(args.model), config, args.tokenizer)
    stats = generate_text(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          speculative=args.speculative)
    if args.stats:
        print(stats.summary(), file=sys.stderr)
    return 0


def cmd_world_make(args) -> int:
    from ds_mtp.experiments.worlds import load_world, make_world, parse_params

    out = make_world(args.world, args.dataset, args.out, seed=args.seed, overwrite=args.force,
                     **parse_params(args.params))
    world = load_world(out)
    print(f"world {world.name} ({world.format}): {world.graph.num_nodes} nodes, {len(world.graph.edges)} edges, "
          f"vocab {world.vocab_size}; {len(world.train_pairs)} train / {len(world.heldout_pairs)} held-out pairs "
          f"-> {out}")
    return 0


def cmd_world_check(args) -> int:
    from ds_mtp.experiments.worlds import check_sequences

    counts = check_sequences(args.graph, "direction" if args.format == "vafa" else args.format, args.file)
    width = max(len(k) for k in counts)
    for name, count in counts.items():
        share = f"  ({count / counts['total']:.1%})" if counts["total"] and name != "total" else ""
        print(f"{name:<{width}}  {count:>7}{share}")
    return 0


def cmd_eval(args) -> int:
    from ds_mtp.experiments.evaluate.suite import format_table, run_eval

    metrics = [m for item in args.metrics for m in item.split(",") if m] if args.metrics else None
    results = run_eval(args.model, args.world, args.out, metrics, args.scale, args.seed, args.device, args.set)
    print(format_table(results))
    if args.out:
        print(f"results: {args.out}")
    return 0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands take their section.field=value overrides anywhere, also after an
    option (argparse fills a positional list from one run of arguments only: ``--nproc 2 train.max_steps=2``
    after an earlier override would be "unrecognized")."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras and isinstance(getattr(parsed, "overrides", None), list) \
                and all("=" in e and not e.startswith("-") for e in extras):
            parsed.overrides = [*parsed.overrides, *extras]  # argv order kept: a later override still wins
        elif extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ds-mtp", description="LSE-MTP pretraining on DeepSpeed")
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
    p.add_argument("--data", default="", help="data directory (manifest.json + shards); same as data.path=DIR")
    p.add_argument("--lse-target", help="latent targets: self, checkpoint:DIR or sentence:DIR (= teacher.source)")
    p.add_argument("--teacher-ranks", type=int, help="last T ranks of the launch run the teacher (= teacher.ranks)")
    p.add_argument("--teacher-layer", type=int, help="checkpoint teacher block to anchor to (= teacher.layer)")
    p.add_argument("--teacher-stride", type=int, help="sentence teacher: every N-th position (= teacher.stride)")
    p.add_argument("--teacher-timeout", type=float, help="seconds to wait for a teacher (= teacher.timeout)")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=200")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="check a single-node, multi-node or MPI launch, print its command, and run it")
    p.add_argument("--config", help="run config (YAML or JSON)")
    p.add_argument("--run-dir", required=True, help="the run directory (shared by all nodes)")
    p.add_argument("--nproc", type=int, default=0,
                   help="ranks on this node (default: its GPUs, or 1 on CPU); with --hostfile, ranks per node")
    p.add_argument("--hostfile", default="", help="'HOST slots=N' per node: start ranks on several nodes")
    p.add_argument("--include", default="", help="only these hosts/slots of the hostfile, e.g. node1@node2:0,1")
    p.add_argument("--exclude", default="", help="all hosts/slots of the hostfile except these")
    p.add_argument("--num-nodes", type=int, default=0, help="use the first N nodes of the hostfile")
    p.add_argument("--launcher", default="pdsh", help="pdsh (deepspeed over ssh), openmpi, mpich or slurm "
                   "(deepspeed's back-ends), or mpirun (ds-mtp runs mpirun; ranks found through mpi4py)")
    p.add_argument("--launcher-args", default="", help="extra arguments for the back-end (pdsh/mpirun/srun)")
    p.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (run once per node)")
    p.add_argument("--node-rank", type=int, default=-1, help="with --no-ssh: this node's index in the hostfile")
    p.add_argument("--master-addr", default="", help="address of the node with rank 0")
    p.add_argument("--master-port", type=int, default=0, help="rendezvous port (default 29500, checked to be free)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in RUN_DIR")
    p.add_argument("--dry-run", action="store_true", help="check and print the command, start nothing")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.max_steps=200")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("export", help="consolidate a ZeRO or pipeline checkpoint into model.safetensors + config.json")
    p.add_argument("run_dir", nargs="?", help="the training run directory (--format hf: or an exported model)")
    p.add_argument("--run-dir", dest="run_dir_option", help=argparse.SUPPRESS)
    p.add_argument("--tag", help="checkpoint tag, e.g. step200 (default: the latest)")
    p.add_argument("--out", required=True, help="directory for model.safetensors and config.json")
    p.add_argument("--overwrite", action="store_true", help="replace an exported model already in --out")
    p.add_argument("--format", default="ds-mtp", choices=["ds-mtp", "hf"],
                   help="ds-mtp (default) or hf: the Hugging Face layout (Llama or GPT-2; RUN_DIR may also be an "
                        "exported model directory); needs the [hf] extra")
    p.add_argument("--tokenizer", help="with --format hf: the tokenizer to copy in (default: the run's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="continue prompts with a trained model (KV cache; --speculative drafts "
                                        "with the MTP heads)")
    p.add_argument("--model", required=True, help="model directory (training's model/, ds-mtp export, or "
                                                  "ds-mtp export --format hf), or a run directory with model/")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several); default: --prompts or stdin")
    p.add_argument("--prompts", help="file with one prompt per line ('-' = stdin)")
    p.add_argument("--tokenizer", help="SentencePiece .model, tokenizer/data/world directory (default: the run's, "
                                       "found from the model's data.path)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true",
                   help="the K-1 extra heads draft, head 1 verifies (greedy: the same tokens as plain decoding; "
                        "sampling: the same distribution)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts decoded together (1 = each streams token by token)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--stats", action="store_true", help="print tokens/s and tokens per forward pass to stderr")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="NTP vs MTP vs LSE-MTP on the paper's USG world, evaluated on held-out pairs "
                                    "(reproduce's demo scale; run again to see the results)")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=0, help="training steps per method (0 = the demo's default)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    p.add_argument("--seed", type=int, default=0, help="seed of the USG world (the runs train with seed 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("reproduce", help="train NTP / MTP / LSE-MTP over seeds on a world, evaluate, report mean ± 95%% CI")
    p.add_argument("--world", required=True, help="usg, er, manhattan, edges:PATH, or a world directory")
    p.add_argument("--methods", default="ntp,mtp,lse-mtp", help="comma-separated subset of ntp,mtp,lse-mtp")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method")
    p.add_argument("--scale", default="cpu", help="cpu (2 CPU cores, usg x 3 seeds in 30 min) or paper (GPU)")
    p.add_argument("--out", required=True, help="output directory (report.md, results.json, plots/, runs/)")
    p.add_argument("--k", type=int, default=4, help="heads K of MTP and LSE-MTP")
    p.add_argument("--nproc", type=int, default=0, help="ranks per training run (0 = the scale's default)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's graph and dataset")
    p.add_argument("--resume", action="store_true", help="continue OUT: skip complete runs, finish the others")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides for every training run")
    p.set_defaults(func=cmd_reproduce)

    from data_prep.cli import add_prep_commands

    p = sub.add_parser("prep", help="prepare a text corpus: SentencePiece tokenizer, token shards, verify, inspect")
    add_prep_commands(p)

    world = sub.add_parser("world", help="graph worlds: make one, check sequences against one")
    world_sub = world.add_subparsers(dest="world_command", required=True)
    p = world_sub.add_parser("make", help="build a graph world and write its path datasets as token shards")
    p.add_argument("--world", required=True, help="usg | er | manhattan | edges:PATH")
    p.add_argument("--dataset", default="paper", help="paper | shortest | noisy | random-walks (default paper)")
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json, world.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace a world already in --out")
    p.add_argument("params", nargs="*", help="key=value world/dataset parameters, e.g. n=50 density=0.3 k=3 "
                                             "format=direction num_pairs=20000 (see docs/worlds.md)")
    p.set_defaults(func=cmd_world_make)
    p = world_sub.add_parser("check", help="count valid / illegal-turn / wrong-end sequences in a text file")
    p.add_argument("--graph", required=True, help="an edges file (node direction neighbor) or a world directory")
    p.add_argument("--format", default="vafa", choices=["vafa", "direction", "increment"],
                   help="vafa (= direction: origin dest DIR ... end) or increment (src tgt inc_D ... <eos>)")
    p.add_argument("file", help="one sequence per line")
    p.set_defaults(func=cmd_world_check)

    p = sub.add_parser("eval", help="world-model metrics of an exported model on a world (docs/worlds.md)")
    p.add_argument("--model", "--checkpoint", dest="model", required=True,
                   help="exported model directory (or a training run directory with model/)")
    p.add_argument("--world", required=True, help="world directory made by `ds-mtp world make`")
    p.add_argument("--metrics", nargs="+", help="subset of: paths shortcuts structure belief validity probe "
                                                "compression distinction detour (default all)")
    p.add_argument("--scale", default="default", choices=["quick", "default"],
                   help="trial counts: default = the papers' sizes, quick = a smoke test")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change one scale setting, e.g. --set path_pairs=200 --set detour_probs=[0.05] "
                        "(keys: ds_mtp/experiments/evaluate/suite.py DEFAULT_SCALE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--out", help="write the full results as JSON here")
    p.set_defaults(func=cmd_eval)
    return parser


def run_parsed(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse argv and call the chosen subcommand's function; a UserError (and its kinds: a teacher failure,
    divergence, preemption) becomes one line on stderr and its exit code."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    from ds_mtp.extensions import use_environment_extensions_dir

    use_environment_extensions_dir()  # before any rank starts: they inherit it, and build DeepSpeed's ops once
    return run_parsed(build_parser(), argv)


def prep_main(argv: list[str] | None = None) -> int:
    """``ds-mtp-prep ARGS`` (and ``python -m data_prep ARGS``): ``ds-mtp prep ARGS``."""
    from data_prep.cli import add_prep_commands

    parser = argparse.ArgumentParser(prog="ds-mtp-prep", description="corpus -> SentencePiece -> token shards")
    add_prep_commands(parser)
    return run_parsed(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
