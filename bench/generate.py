"""Plain vs self-speculative decoding (ds_mtp.generate) of a trained model: tokens per forward pass and
wall-clock speed-up, with the same KV cache, one prompt at a time (batch 1, the case speculation serves).

    OMP_NUM_THREADS=1 python bench/generate.py --model MODEL_DIR [--prompts N] [--max-new-tokens M]
        [--temperature T] [--trials R] [--batch-size B]

Prompts: a world model (data.path is a world) decodes held-out pairs ``src tgt``; a text model continues
the first ``--prompt-tokens`` tokens of the first ``--prompts`` documents of its data's ``val`` split.
Each trial decodes every prompt plainly, then speculatively (alternating, so that drift on a shared
machine hits both alike); the table reports the median over trials of the summed seconds. Greedy
outputs are checked to be token for token the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# The repository first: bench/data_prep.py would otherwise shadow the data_prep package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ds_mtp.generate import DecodeStats, generate  # noqa: E402
from ds_mtp.run_dir import resolve_model_dir  # noqa: E402
from ds_mtp.text import load_model_dir  # noqa: E402
from ds_mtp.tokenizers import resolve_data_path  # noqa: E402


def world_prompts(data_dir, count: int) -> tuple[list[list[int]], int]:
    from ds_mtp.experiments.evaluate.paths import select_pairs
    from ds_mtp.experiments.worlds import load_world

    world = load_world(data_dir)
    return [[s, t] for s, t in select_pairs(world.heldout_pairs, count, seed=0)], world.tokenizer.eos_id


def text_prompts(data_dir, count: int, length: int) -> tuple[list[list[int]], int]:
    from ds_mtp.data import TokenShards, read_meta

    shards = TokenShards(data_dir, "val")
    prompts = []
    for i in range(shards.num_documents):
        doc = shards.document(i)
        if len(doc) > length:
            prompts.append([int(t) for t in doc[:length]])
        if len(prompts) == count:
            break
    return prompts, read_meta(data_dir).special_ids.get("eos")


def decode_all(model, prompts, eos_id, speculative: bool, args) -> tuple[list[list[int]], DecodeStats]:
    total, outputs = DecodeStats(), []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(prompts), args.batch_size):
        g = generate(model, prompts[start:start + args.batch_size], args.max_new_tokens, eos_id=eos_id,
                     temperature=args.temperature, generator=generator, speculative=speculative)
        outputs += g.tokens
        for name in ("tokens", "forward_passes", "row_steps", "drafted", "accepted", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(g.stats, name))
    return outputs, total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="text models: tokens of each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    model, config = load_model_dir(args.model)
    data_dir = resolve_data_path(config["data"]["path"], resolve_model_dir(args.model))
    if (data_dir / "world.json").is_file():
        prompts, eos_id = world_prompts(data_dir, args.prompts)
    else:
        prompts, eos_id = text_prompts(data_dir, args.prompts, args.prompt_tokens)
    m = model.cfg
    print(f"model {args.model}: {m.n_layer}L d={m.d_model} K={m.mtp_k} {m.head_type} heads, "
          f"{len(prompts)} prompts, max {args.max_new_tokens} new tokens, T={args.temperature}, "
          f"batch {args.batch_size}, {torch.get_num_threads()} thread(s)", flush=True)
    generate(model, prompts[:2], 4)  # warm-up
    times = {False: [], True: []}
    stats = {}
    for trial in range(args.trials):
        for speculative in (False, True):
            started = time.perf_counter()
            outputs, s = decode_all(model, prompts, eos_id, speculative, args)
            times[speculative].append(time.perf_counter() - started)
            stats[speculative] = (outputs, s)
        if args.temperature == 0 and stats[False][0] != stats[True][0]:
            raise SystemExit("greedy speculative output differs from plain greedy output")
        print(f"trial {trial}: plain {times[False][-1]:.2f} s, speculative {times[True][-1]:.2f} s", flush=True)
    plain, spec = statistics.median(times[False]), statistics.median(times[True])
    s = stats[True][1]
    result = {"prompts": len(prompts), "tokens": s.tokens, "plain_s": plain, "speculative_s": spec,
              "plain_tokens_per_s": stats[False][1].tokens / plain, "speculative_tokens_per_s": s.tokens / spec,
              "tokens_per_forward": s.tokens_per_forward, "acceptance_rate": s.acceptance_rate,
              # what one forward pass costs (prompt passes included): verification feeds up to K tokens
              "plain_ms_per_pass": 1000 * plain / stats[False][1].forward_passes,
              "speculative_ms_per_pass": 1000 * spec / s.forward_passes,
              "speedup": plain / spec, "identical_greedy": args.temperature == 0}
    print(json.dumps(result, indent=2))
    print(f"| {m.n_layer}L d={m.d_model} K={m.mtp_k} {m.head_type} | {len(prompts)} × ≤{args.max_new_tokens} | "
          f"{s.tokens} | {result['plain_tokens_per_s']:.1f} | {result['speculative_tokens_per_s']:.1f} | "
          f"{s.tokens_per_forward:.2f} | {s.acceptance_rate:.2f} | {result['plain_ms_per_pass']:.2f} | "
          f"{result['speculative_ms_per_pass']:.2f} | **{plain / spec:.2f}×** |")


if __name__ == "__main__":
    main()
