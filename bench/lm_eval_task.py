"""A local lm-eval-harness task over a text model's held-out documents, and ds-mtp's own answer to it.

    python bench/lm_eval_task.py --model MODEL_DIR --out TASK_DIR [--docs N]

Writes TASK_DIR/docs.jsonl (the first N documents of the model's held-out split (data.eval_split, else
``val``) that fit its context,
decoded to text) and TASK_DIR/ds_mtp_heldout.yaml, a ``loglikelihood_rolling`` task (bits per byte, as
lm-eval's wikitext task), so that the harness runs offline:

    lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32,prefix_token_id=EOS \\
        --tasks ds_mtp_heldout --include_path TASK_DIR --device cpu --batch_size 1

It also prints the bits per byte ds-mtp itself computes on the same texts (each document scored after the
EOS token, as the harness does with prefix_token_id=EOS, and as the model saw documents in training: one
after another's EOS), to check the harness's number against.
"""

from __future__ import annotations

import argparse
import json
import sys
import math
from pathlib import Path

import torch

# The repository first: bench/data_prep.py would otherwise shadow the data_prep package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASK = """task: ds_mtp_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def main() -> None:
    from ds_mtp.data import TokenShards
    from ds_mtp.run_dir import resolve_model_dir
    from ds_mtp.text import load_model_dir
    from ds_mtp.tokenizers import find_tokenizer, resolve_data_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="a ds-mtp model directory (or its HF export)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--docs", type=int, default=40)
    args = parser.parse_args()

    model, config = load_model_dir(args.model)
    tokenizer = find_tokenizer(resolve_model_dir(args.model), config)
    data_dir = resolve_data_path(config["data"]["path"], resolve_model_dir(args.model))
    shards = TokenShards(data_dir, config["data"].get("eval_split") or "val")  # a world's is "heldout"
    texts = []
    for i in range(shards.num_documents):
        text = tokenizer.decode([int(t) for t in shards.document(i)])
        # one rolling window: the EOS prefix plus the document fit the context
        if text.strip() and len(tokenizer.encode(text)) < model.cfg.max_seq_len:
            texts.append(text)
        if len(texts) == args.docs:
            break
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (out / "ds_mtp_heldout.yaml").write_text(TASK.format(docs=(out / "docs.jsonl").resolve()))

    nll, num_bytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text)
            tokens = torch.tensor([[tokenizer.eos_id, *ids]])
            logp = torch.log_softmax(model.logits(tokens)[0, :-1].double(), dim=-1)
            nll -= logp.gather(-1, tokens[0, 1:, None]).sum().item()
            num_bytes += len(text.encode("utf-8"))
    print(json.dumps({"docs": len(texts), "bytes": num_bytes, "eos_id": tokenizer.eos_id,
                      "ds_mtp_bits_per_byte": nll / num_bytes / math.log(2),
                      "ds_mtp_byte_perplexity": math.exp(nll / num_bytes)}, indent=2))


if __name__ == "__main__":
    main()
