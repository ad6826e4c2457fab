"""Training throughput and peak memory of next-token vs multi-token (LSE-)MTP, materialised vs chunked loss.

    python bench/throughput.py                                  # small model on CPU (< 3 min on 2 cores)
    python bench/throughput.py --shape gpt2 --device cuda       # GPT-2-small shape, bf16 autocast (bench/gpu.sh)
    python bench/throughput.py --shape paper-graph --device cuda --configs ntp,lse4-linear

Each configuration trains a few steps on random tokens (the loss path does not depend on the data) and
reports the median ms/step after warm-up, tokens/s, peak memory and, on GPU, MFU against a bf16 matmul
measured in the same run. Ratios are to the first row of the same runner (``ntp``), so compare within
one table: the machines this runs on are shared and noisy.

Configuration names: ``ntp`` (K=1), ``mtp4`` (K=4 linear heads, CE only), ``lse4-{linear,block,sequential}``
(K=4 with the latent and semantic terms), each with ``:materialized`` or ``:chunked`` (default chunked),
and ``+compile`` for torch.compile. ``plain-ntp`` / ``plain-lse4`` are the bar: a plain PyTorch
loss over the full [B, T, V] logits with ignore_index masks (fully compilable, as user code would be).
Runners: ``--engine plain`` (model + AdamW, autocast bf16 on GPU) or ``--engine deepspeed``
(ds_mtp.engine.build_engine, the training path, ZeRO stage ``--zero-stage``).

On CPU each configuration runs in its own process and peak memory is the process's peak RSS above
what it held before building the model; on GPU it is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    # A small model whose vocabulary is large enough that the logits dominate memory, as in LMs.
    "cpu-small": dict(model=dict(n_layer=2, n_head=4, d_model=128, vocab_size=8192, max_seq_len=128,
                                 positions="learned", norm="layernorm", mlp="gelu"), batch=8, seq_len=128),
    # GPT-2 small as in the reference table: 12 layers, d=768, V=50304, batch 8 × 1024.
    "gpt2": dict(model=dict(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024,
                            positions="learned", norm="layernorm", mlp="gelu"), batch=8, seq_len=1024),
    # The paper's graph model (6L, d=120) at the paper's batch, 1024 × 32 tokens; vocabulary of a USG world.
    "paper-graph": dict(model=dict(preset="paper-graph", vocab_size=128, max_seq_len=64), batch=1024, seq_len=32),
}

DEFAULT_CONFIGS = ("ntp:materialized,ntp,mtp4:materialized,mtp4,lse4-linear:materialized,lse4-linear,"
                   "lse4-block:materialized,lse4-block,lse4-sequential:materialized,lse4-sequential")


def parse_config(name: str) -> dict:
    """'lse4-block:materialized+compile' → {name, K, head_type, lambdas, loss_impl, compile, plain}."""
    base, _, flags = name.partition("+")
    if flags not in ("", "compile"):
        raise SystemExit(f"error: unknown flag '+{flags}' in configuration '{name}' (only +compile)")
    base, _, impl = base.partition(":")
    impl = impl or "chunked"
    if impl not in ("chunked", "materialized"):
        raise SystemExit(f"error: unknown loss implementation '{impl}' in '{name}'")
    plain = base.startswith("plain-")
    kind = base.removeprefix("plain-")
    if kind == "ntp":
        spec = dict(K=1, head_type="linear", lse=False)
    elif kind == "mtp4":
        spec = dict(K=4, head_type="linear", lse=False)
    elif kind == "lse4" or kind.startswith("lse4-"):
        head = kind.partition("-")[2] or "linear"
        if head not in ("linear", "block", "sequential"):
            raise SystemExit(f"error: unknown head type '{head}' in '{name}'")
        spec = dict(K=4, head_type=head, lse=True)
    else:
        raise SystemExit(f"error: unknown configuration '{name}' (see --help)")
    return dict(name=name, loss_impl="materialized" if plain else impl, compile=flags == "compile",
                plain=plain, **spec)


# ----------------------------------------------------------------------------------------------------
# One configuration (runs in the child process on CPU, in-process on GPU)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def plain_loss(model, tokens, doc_ids, lam: float):
    """The user-code bar: every head's full [B, T-k, V] logits, masks via ignore_index and weights."""
    import torch
    import torch.nn.functional as F

    from ds_mtp.objective import valid_mask

    h, head_hidden = model.states(tokens)
    states = [h] if head_hidden is None else [h, *head_hidden.unbind(1)]
    W, E = model.unembed_weight, model.embed.weight.detach()
    T = tokens.shape[1]
    loss = 0.0
    for k, pred in enumerate(states, start=1):
        pred = pred[:, : T - k]
        valid = valid_mask(tokens, k, None, doc_ids)
        target = tokens[:, k:].masked_fill(~valid, -100)
        loss = loss + F.cross_entropy((pred @ W.t()).float().flatten(0, 1), target.flatten(), ignore_index=-100)
        if k > 1 and lam:
            weight = valid.float() / valid.sum().clamp(min=1)
            latent = (pred - h.detach()[:, k - 1: T - 1]).float().pow(2).mean(-1)
            semantic = (pred - F.embedding(tokens[:, k:], E)).float().pow(2).mean(-1)
            loss = loss + lam * ((latent + semantic) * weight).sum()
    return loss


def build(spec: dict, shape: dict, args):
    """The model, optimizer and one training step of a configuration. Returns (step, model, batches)."""
    import torch

    from ds_mtp.config import PRESETS, ModelConfig, ObjectiveConfig, RunConfig, TrainConfig
    from ds_mtp.model import MTPModel

    cuda = args.device == "cuda"
    if spec["compile"]:  # every configuration builds new modules: recompile for them rather than fall back to eager
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    torch.manual_seed(0)
    preset = PRESETS.get(shape["model"].get("preset", ""), {})
    mcfg = ModelConfig(**{**preset, **shape["model"], "mtp_k": spec["K"], "head_type": spec["head_type"]})
    lam = 0.1 if spec["lse"] else 0.0
    ocfg = ObjectiveConfig(lambda_latent=lam, lambda_semantic=lam, loss_impl=spec["loss_impl"],
                           chunk_rows=args.chunk_rows)
    B, T = shape["batch"], shape["seq_len"]
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(device) for _ in range(4)]
    doc_ids = torch.zeros(B, T, dtype=torch.long, device=device)

    if args.engine == "deepspeed":
        from ds_mtp.engine import build_engine, init_distributed

        init_distributed()
        train = TrainConfig(seq_len=T, micro_batch=B, max_steps=10 ** 6, zero_stage=args.zero_stage,
                            compile="always" if spec["compile"] else "never")
        engine, model = build_engine(RunConfig(model=mcfg, objective=ocfg, train=train), None)

        def step(tokens):
            out = engine(tokens, doc_ids)
            engine.backward(out["loss"])
            engine.step()
        return step, model, batches

    from ds_mtp.engine import param_groups

    model = MTPModel(mcfg, ocfg).to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, fused=cuda)
    loss_fn = (lambda m, x, d: plain_loss(m, x, d, lam)) if spec["plain"] else (lambda m, x, d: m(x, d)["loss"])
    if spec["compile"]:
        if spec["plain"]:
            loss_fn = torch.compile(loss_fn)
        else:  # trunk and heads compile whole; the loss picks valid rows (data-dependent), so its chunks do
            for block in model.blocks:
                block.compile()
            model.heads.compile()
            if spec["loss_impl"] == "chunked":
                from ds_mtp.fused_ce import compile_chunk_kernel

                compile_chunk_kernel()

    def step(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model, tokens, doc_ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model, batches


def timed_step(step, tokens, cuda: bool) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one step."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.thread_time()
    step(tokens)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.thread_time() - cpu


def summarise(spec: dict, shape: dict, model, walls: list, cpus: list, peak: int) -> dict:
    from ds_mtp.monitor import model_flops_per_token  # the MFU convention training reports too

    ms = 1000 * statistics.median(walls)
    return dict(config=spec["name"], ms_per_step=ms, cpu_ms_per_step=1000 * statistics.median(cpus),
                tokens_per_s=shape["batch"] * shape["seq_len"] / (ms / 1000), peak_bytes=peak,
                flops_per_token=model_flops_per_token(model, shape["seq_len"]),
                parameters=sum(p.numel() for p in model.parameters()))


def run_one(spec: dict, shape: dict, args) -> dict:
    """Build, warm up and time one configuration alone; peak memory is this configuration's."""
    import torch

    cuda = args.device == "cuda"
    rss_start = None if cuda else rss_bytes()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, model, batches = build(spec, shape, args)
    walls, cpus = [], []
    for i in range(args.warmup + args.steps):
        wall, cpu = timed_step(step, batches[i % len(batches)], cuda)
        if i >= args.warmup:
            walls.append(wall)
            cpus.append(cpu)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start
    result = summarise(spec, shape, model, walls, cpus, peak)
    if cuda:
        del model, step
        torch.cuda.empty_cache()
        from ds_mtp.fused_ce import compile_chunk_kernel

        compile_chunk_kernel(False)
    return result


def run_interleaved(specs: list[dict], shape: dict, args) -> dict:
    """CPU timing: every configuration built in this process and stepped in turn, round after round, so
    load from other processes on a shared machine falls on all of them alike. {name: (walls, cpus, model)}."""
    built = {s["name"]: build(s, shape, args) for s in specs}
    times = {name: ([], []) for name in built}
    for i in range(args.warmup + args.steps):
        for name, (step, _, batches) in built.items():
            wall, cpu = timed_step(step, batches[i % len(batches)], False)
            if i >= args.warmup:
                times[name][0].append(wall)
                times[name][1].append(cpu)
    return {name: (*times[name], built[name][1]) for name in built}


def matmul_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - started) / 1e12


# ----------------------------------------------------------------------------------------------------
# The driver


def child_command(name: str, args) -> list[str]:
    """A process that measures one configuration's peak memory (one warm-up step and one step)."""
    return [sys.executable, __file__, "--one", name, "--shape", args.shape, "--device", args.device,
            "--engine", args.engine, "--zero-stage", str(args.zero_stage), "--steps", "1", "--warmup", "1",
            "--chunk-rows", str(args.chunk_rows)]


def table(rows: list[dict], peak_tflops: float | None, cpu: bool) -> str:
    """Markdown; × columns are ratios to the first row."""
    base = rows[0] if rows and "ms_per_step" in rows[0] else None
    head = ["configuration", "ms/step", *(["CPU ms/step"] if cpu else []), "tokens/s", "peak MiB", "× ms",
            "× memory", *(["MFU"] if peak_tflops else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |")
            continue
        cells = [r["config"], f"{r['ms_per_step']:.1f}", *([f"{r['cpu_ms_per_step']:.1f}"] if cpu else []),
                 f"{r['tokens_per_s']:,.0f}", f"{r['peak_bytes'] / 2**20:,.0f}",
                 f"{r['ms_per_step'] / base['ms_per_step']:.2f}" if base else "",
                 f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base and base["peak_bytes"] > 0 else ""]
        if peak_tflops:
            cells.append(f"{r['tokens_per_s'] * r['flops_per_token'] / (peak_tflops * 1e12):.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu-small")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--engine", choices=("plain", "deepspeed"), default="plain")
    p.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage for --engine deepspeed (default 0)")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated configuration names (see above)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--chunk-rows", type=int, default=0, help="objective.chunk_rows (0 = auto)")
    p.add_argument("--budget-s", type=float, default=0, help="skip the remaining configurations after this long")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.one:  # child: one configuration, one JSON line
        print("RESULT " + json.dumps(run_one(parse_config(args.one), shape, args)), flush=True)
        return 0
    specs = [parse_config(n.strip()) for n in args.configs.split(",") if n.strip()]
    cuda = args.device == "cuda"
    started = time.perf_counter()
    peak_tflops = None
    if cuda:
        peak_tflops = matmul_peak_tflops()
        print(f"bf16 8192^3 matmul: {peak_tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for spec in specs:
        if args.budget_s and time.perf_counter() - started > args.budget_s:
            rows.append(dict(config=spec["name"], error=f"skipped (over --budget-s {args.budget_s:g})"))
            continue
        t0 = time.perf_counter()
        if cuda:  # in-process: a CUDA start per configuration would cost more than the measurement
            try:
                row = run_one(spec, shape, args)
            except KeyboardInterrupt:  # a hard time limit (timeout -s INT): still print what was measured
                rows.append(dict(config=spec["name"], error="interrupted"))
                break
            except Exception as e:  # one failing configuration must not lose the others' figures
                row = dict(config=spec["name"], error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}")
        else:  # peak memory needs a process of its own; its timing is replaced by the interleaved one below
            proc = subprocess.run(child_command(spec["name"], args), capture_output=True, text=True)
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not found:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]
                row = dict(config=spec["name"], error=f"exit {proc.returncode}: {tail}")
            else:
                row = json.loads(found[-1].removeprefix("RESULT "))
        rows.append(row)
        measured = f"{row.get('peak_bytes', 0) / 2**20:.0f} MiB peak"
        if cuda and "ms_per_step" in row:
            measured = f"{row['ms_per_step']:.1f} ms/step, {measured}"
        print(f"{spec['name']}: {row.get('error') or measured} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not cuda:
        ok = [s for s, r in zip(specs, rows) if "error" not in r]
        print(f"timing {len(ok)} configurations interleaved, {args.warmup} + {args.steps} rounds", flush=True)
        for name, (walls, cpus, model) in run_interleaved(ok, shape, args).items():
            i = next(j for j, r in enumerate(rows) if r["config"] == name)
            rows[i] = {**summarise(specs[i], shape, model, walls, cpus, rows[i]["peak_bytes"])}
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, peak_tflops=peak_tflops, args=vars(args)), indent=1))
    import torch

    where = torch.cuda.get_device_name() if cuda else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"\n{args.shape}, {args.engine} runner, {where}, torch {torch.__version__}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(table(rows, peak_tflops, cpu=not cuda))
    return 1 if any("error" in r and not r["error"].startswith("skipped") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
