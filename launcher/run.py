"""``ds-mtp launch``: check a launch, print its exact command, and run it (or stop, with ``--dry-run``)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ds_mtp.errors import EXIT_PREEMPTED, UserError
from ds_mtp.ranks import DEFAULT_MASTER_PORT, SLURM_MARKER, RankLayout, layout_of
from ds_mtp.run_dir import RunDir, RunLock, check_new_or_resume
from launcher import checks
from launcher.commands import LAUNCHERS, deepspeed_command, mpirun_command, render
from launcher.hostfile import read_hostfile, select_slots


@dataclass
class LaunchOptions:
    """What the user asked for on the command line (see ``ds-mtp launch --help``)."""

    run_dir: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    nproc: int = 0
    hostfile: str = ""
    include: str = ""
    exclude: str = ""
    num_nodes: int = 0
    launcher: str = "pdsh"
    launcher_args: str = ""
    no_ssh: bool = False
    node_rank: int = -1
    master_addr: str = ""
    master_port: int = 0
    resume: bool = False
    dry_run: bool = False


@dataclass
class Launch:
    """A checked launch: the command, its environment, and what it will start."""

    command: list[str]
    env: dict[str, str]
    nodes: dict[str, list[int]]
    layout: RankLayout
    master_port: int
    leads: bool
    """True when this invocation prepares the run directory (it starts rank 0's node, or all nodes)."""
    summary: str


def _check_flags(o: LaunchOptions) -> None:
    if o.launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher '{o.launcher}' (choose from {', '.join(LAUNCHERS)})")
    if o.nproc < 0 or o.num_nodes < 0:
        raise UserError("--nproc and --num-nodes must not be negative")
    if (o.include or o.exclude or o.num_nodes) and not o.hostfile:
        raise UserError("--include, --exclude and --num-nodes select nodes of a --hostfile")
    if o.no_ssh:
        if o.launcher != "pdsh":
            raise UserError(f"--no-ssh starts this node's ranks itself; it does not combine with --launcher {o.launcher}")
        if not o.hostfile:
            raise UserError("--no-ssh needs --hostfile (the same file on every node)")
        if o.node_rank < 0:
            raise UserError("--no-ssh needs --node-rank R (0 on the node whose address is --master-addr)")
        if not o.master_addr:
            raise UserError("--no-ssh needs --master-addr (the address of the node with --node-rank 0)")
    elif o.node_rank >= 0:
        raise UserError("--node-rank applies only with --no-ssh")
    if o.launcher in ("openmpi", "mpich", "slurm") and not o.hostfile:
        raise UserError(f"--launcher {o.launcher} starts ranks on several nodes: give --hostfile (see docs/launching.md)")


def _nodes(o: LaunchOptions) -> dict[str, list[int]]:
    if o.hostfile:
        nodes = select_slots(read_hostfile(o.hostfile), o.include, o.exclude, o.num_nodes, o.nproc)
        if o.no_ssh and o.node_rank >= len(nodes):
            raise UserError(f"--node-rank {o.node_rank}: the hostfile has {len(nodes)} node(s) (ranks 0..{len(nodes) - 1})")
        return nodes
    gpus = checks.local_gpu_count()
    nproc = o.nproc or max(1, gpus)
    if gpus and nproc > gpus:
        raise UserError(f"--nproc {nproc}: this node has {gpus} GPU(s)")
    return {"localhost": list(range(nproc))}


def _master_here(o: LaunchOptions, nodes: dict[str, list[int]]) -> bool:
    """Whether rank 0, and so the rendezvous port, will be on this machine."""
    if o.no_ssh:
        return o.node_rank == 0
    if not o.hostfile:
        return True
    return checks.is_local_address(o.master_addr or next(iter(nodes)))


def _train_args(o: LaunchOptions) -> list[str]:
    args = ["train", "--run-dir", str(Path(o.run_dir).resolve())]
    if o.config:
        args += ["--config", str(Path(o.config).resolve())]
    if o.resume:
        args.append("--resume")
    return [*args, *o.overrides]


def plan_launch(o: LaunchOptions) -> tuple[Launch, object]:
    """Check everything that can be checked here and compose the command. Returns (launch, run config)."""
    from ds_mtp.config import load_config
    from ds_mtp.run_data import resolve_data

    _check_flags(o)
    cfg = load_config(o.config, o.overrides)
    nodes = _nodes(o)
    world = sum(len(slots) for slots in nodes.values())
    layout = layout_of(cfg, world)
    if cfg.train.pipeline_stages > 1:
        from ds_mtp.pipeline import check_layout

        check_layout(cfg, world)
    cfg = resolve_data(cfg)
    checks.check_ds_config(cfg, layout.data_parallel)
    leads = not o.no_ssh or o.node_rank == 0
    if leads:
        check_new_or_resume(RunDir(o.run_dir), o.resume)
    port = _master_port(o, nodes, layout, cfg)

    # Without an address DeepSpeed asks the first host over ssh; under slurm that host is rank 0's node.
    master_addr = o.master_addr or (next(iter(nodes)) if o.launcher == "slurm" else "")
    env = {"PYTHONUNBUFFERED": "1"}
    if leads:
        env["DS_MTP_PREPARED"] = "1"  # rank 0 need not check and write RUN_DIR/config.json again
    if o.launcher == "slurm":
        # srun --export=ALL hands these to every task; ds_mtp.ranks.read_launch maps SLURM_PROCID to the rank.
        env.update({SLURM_MARKER: "1", "MASTER_ADDR": master_addr, "MASTER_PORT": str(port)})
    if o.launcher == "mpirun":
        command = _mpirun(o, nodes, world, port, env)
    else:
        command = _deepspeed(o, nodes, world, port, master_addr)
    return Launch(command, env, nodes, layout, port, leads, _summary(o, nodes, layout, cfg)), cfg


def _master_port(o: LaunchOptions, nodes: dict[str, list[int]], layout: RankLayout, cfg) -> int:
    """--master-port, else 29500 (a single node moves to a free port); checked when rank 0 runs here."""
    port = o.master_port
    if not port:
        port = DEFAULT_MASTER_PORT
        if not o.hostfile and not checks.port_is_free(port):
            from ds_mtp.ranks import free_port

            port = free_port()  # nothing else has to agree on a single node's port
    if _master_here(o, nodes):
        ports = {"--master-port": port}
        if layout.teacher_ranks:
            ports["teacher.port"] = getattr(cfg.teacher, "port", 0) or port + 1
        checks.check_ports(ports)
    return port


def _mpirun(o: LaunchOptions, nodes: dict[str, list[int]], world: int, port: int, env: dict) -> list[str]:
    checks.check_mpi4py()
    mpirun = checks.find_executable("mpirun")
    if mpirun is None:
        raise UserError("mpirun not found: pip install mpich mpi4py, or load your cluster's MPI")
    hosts = {h: len(s) for h, s in nodes.items()} if o.hostfile else None
    return mpirun_command(mpirun, checks.mpi_flavor(mpirun), _train_args(o), world_size=world, hosts=hosts,
                          env={"MASTER_PORT": str(port), **env}, launcher_args=o.launcher_args)


def _deepspeed(o: LaunchOptions, nodes: dict[str, list[int]], world: int, port: int, master_addr: str) -> list[str]:
    deepspeed = checks.find_executable("deepspeed")
    runner = [deepspeed] if deepspeed else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if o.hostfile:
        return deepspeed_command(runner, _train_args(o), master_port=port, nproc=o.nproc,
                                 hostfile=str(Path(o.hostfile).resolve()), include=o.include, exclude=o.exclude,
                                 num_nodes=o.num_nodes, master_addr=master_addr, launcher=o.launcher,
                                 launcher_args=o.launcher_args, no_ssh=o.no_ssh, node_rank=o.node_rank)
    # DeepSpeed drops CUDA_VISIBLE_DEVICES once --num_gpus is given and would take GPUs 0..N-1: name the
    # visible ones instead.
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and checks.local_gpu_count():
        return deepspeed_command(runner, _train_args(o), master_port=port,
                                 include="localhost:" + ",".join(visible[:world]), launcher_args=o.launcher_args)
    return deepspeed_command(runner, _train_args(o), master_port=port, nproc=world, launcher_args=o.launcher_args)


def _summary(o: LaunchOptions, nodes: dict[str, list[int]], layout: RankLayout, cfg) -> str:
    t = cfg.train
    where = (f"{len(nodes)} node(s) ({', '.join(f'{h}:{len(s)}' for h, s in nodes.items())})" if o.hostfile
             else "this node")
    teachers = f" + {layout.teacher_ranks} teacher rank(s)" if layout.teacher_ranks else ""
    via = "mpirun" if o.launcher == "mpirun" else ("deepspeed --no_ssh, node rank %d" % o.node_rank if o.no_ssh
                                                   else f"deepspeed ({o.launcher})" if o.hostfile else "deepspeed")
    return (f"# ds-mtp launch via {via}: {layout.world_size} rank(s) on {where} = {layout.trainers} trainer(s) "
            f"[{layout.pipeline_stages} pipeline stage(s) x {layout.data_parallel} data-parallel]{teachers}; "
            f"{t.micro_batch * t.grad_accum * layout.data_parallel} windows of {t.seq_len} tokens per step")


BACK_ENDS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "slurm": "srun"}


def _check_back_end(o: LaunchOptions, plan: Launch) -> None:
    """The program DeepSpeed's multi-node runner will call must exist here (checked for real runs only, so a
    dry run works on a machine without it)."""
    if not o.hostfile or o.no_ssh or o.launcher == "mpirun" or len(plan.nodes) < 2:
        return
    program = BACK_ENDS[o.launcher]
    if checks.find_executable(program) is None:
        hint = " (or start each node with --no-ssh --node-rank R)" if o.launcher == "pdsh" else ""
        raise UserError(f"--launcher {o.launcher} needs {program}, which is not installed here{hint}")


def is_rank_command(argv: list[str]) -> bool:
    """A rank's command line: ``python [-u] -m ds_mtp.cli ...`` or ``python launcher/rank.py ...``; not the
    launchers around it (deepspeed's runner and launch.py, mpirun), whose arguments name ds_mtp.cli too."""
    if not argv or not Path(argv[0]).name.startswith("python"):
        return False
    args = [a for a in argv[1:] if a != "-u"]
    return args[:2] == ["-m", "ds_mtp.cli"] or (bool(args) and args[0].endswith("launcher/rank.py"))


def _rank_processes(root: int) -> list:
    """The rank processes below the launcher process ``root``."""
    import psutil

    try:
        below = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for proc in below:
        try:
            if is_rank_command(proc.cmdline()):
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


def supervise(command: list[str], env: dict[str, str], run_dir: RunDir) -> int:
    """Run the launcher command and return its exit code. SIGTERM or SIGINT to this process goes to every rank
    below it as SIGTERM: the ranks save a checkpoint at their next step boundary and exit EXIT_PREEMPTED
    (DeepSpeed's single-node runner would die and leave them running; docs/reliability.md)."""
    import signal

    import time

    proc = subprocess.Popen(command, env=env)
    received: list[float] = []  # when each signal came
    ranks: list = []

    def forward(signum, frame) -> None:
        received.append(time.time())
        ranks[:] = _rank_processes(proc.pid) or ranks
        for rank in ranks:
            try:
                rank.send_signal(signal.SIGTERM)
            except Exception:  # noqa: BLE001 - a rank that has just exited
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
        if received:
            import psutil

            psutil.wait_procs(ranks, timeout=600)  # the runner may have died first: wait for the ranks' saves
            if code != EXIT_PREEMPTED and _saved_since(run_dir, received[0]):
                code = EXIT_PREEMPTED
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _saved_since(run_dir: RunDir, when: float) -> bool:
    """Whether the ranks moved `latest` (saved a complete checkpoint) after the stop signal."""
    try:
        return run_dir.latest.stat().st_mtime >= when
    except OSError:
        return False


def resize_overrides(o: LaunchOptions, plan: Launch, cfg) -> list[str]:
    """``--resume`` of a checkpoint saved on another number of data-parallel ranks: convert it (ds_mtp.universal)
    and return the override that keeps its global batch; nodes that do not lead are told by their ranks."""
    paths = RunDir(o.run_dir)
    if not (o.resume and plan.leads and not o.dry_run and paths.has_checkpoint()):
        return []
    from ds_mtp.checkpoint import resume_tag
    from ds_mtp.universal import prepare_resize

    return prepare_resize(cfg, paths.checkpoints, plan.layout.data_parallel, resume_tag(paths)[0])


def launch(o: LaunchOptions) -> int:
    """Check, print the exact command, and run it (unless dry_run). Returns the launcher's exit code.

    The invocation that leads (all nodes, or node rank 0 of --no-ssh) holds RUN_DIR's lock from before its checks
    until the ranks have exited, so a second writer is refused before it reads anything."""
    from ds_mtp.train import prepare_run

    lock = RunLock(RunDir(o.run_dir))
    if not o.dry_run and (not o.no_ssh or o.node_rank == 0):
        lock.acquire()
    try:
        plan, cfg = plan_launch(o)
        resize = resize_overrides(o, plan, cfg)  # a checkpoint saved on another number of ranks
        if resize:
            o.overrides = [*o.overrides, *resize]
            plan, cfg = plan_launch(o)
        print(plan.summary)
        print(render(plan.command, plan.env), flush=True)
        if o.dry_run:
            return 0
        _check_back_end(o, plan)
        if plan.leads:
            prepare_run(cfg, o.run_dir, o.resume)
        try:
            return supervise(plan.command, {**os.environ, **plan.env}, RunDir(o.run_dir))
        except FileNotFoundError as e:
            raise UserError(f"cannot start {plan.command[0]}: {e.strerror}") from None
        finally:  # a single-node launch's ranks leave DeepSpeed's CPU all-reduce buffers in this node's /dev/shm
            from ds_mtp.shm_buffers import remove_launch_buffers

            remove_launch_buffers(plan.master_port)
    finally:
        lock.release()
