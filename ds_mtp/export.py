"""Consolidate a DeepSpeed training checkpoint into one exported model directory.

``ds-mtp export RUN_DIR [--tag stepN] --out DIR`` reads RUN_DIR/config.json and the checkpoint tag
(default: the latest) and writes DIR/model.safetensors + DIR/config.json (ds_mtp.model.save_exported),
which ds_mtp.model.load_exported reads with no DeepSpeed and no process group. It runs in one
process on CPU, from the files alone:

- ZeRO-1/2/3 without a pipeline: the fp32 master weights, gathered from every rank's optimizer
  partition by DeepSpeed's zero_to_fp32;
- ZeRO-0: the module weights DeepSpeed stores whole;
- a pipeline (train.pipeline_stages > 1): the per-layer files of every stage (ds_mtp.pipeline), i.e.
  the weights the stages compute with (fp32 on CPU; under bf16 the bf16 weights, widened).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import torch

from ds_mtp import safe_load
from ds_mtp.config import config_from_dict
from ds_mtp.errors import UserError
from ds_mtp.run_dir import LATEST_FILE


def checkpoint_tag(ckpt_dir: Path, tag: str | None) -> str:
    """The requested tag, or the latest one; a missing tag names the ones there are."""
    available = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir()), key=lambda n: (len(n), n)) \
        if ckpt_dir.is_dir() else []
    if tag is None:
        latest = ckpt_dir / LATEST_FILE
        if not latest.is_file():
            raise UserError(f"no checkpoint in {ckpt_dir} (train with checkpoints first)")
        tag = latest.read_text().strip()
    if tag not in available:
        raise UserError(f"no checkpoint tag '{tag}' in {ckpt_dir} (has: {', '.join(available) or 'none'})")
    return tag


def _client_state(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))  # zero_pp_rank_R_ under ZeRO-2/3
    if not files:
        raise UserError(f"{tag_dir} is not a DeepSpeed checkpoint (no *mp_rank_*_model_states.pt)")
    return safe_load.load(files[0])


def zero_state_dict(ckpt_dir: Path, tag: str, zero_stage: int, client: dict) -> dict[str, torch.Tensor]:
    if zero_stage == 0:
        return dict(client["module"])
    import logging

    from deepspeed.utils import logger as ds_logger
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ds_logger.setLevel(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        # zero_to_fp32 narrates each file it reads, and loads them with weights_only=False
        with contextlib.redirect_stdout(io.StringIO()), safe_load.weights_only_torch_load():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot consolidate the ZeRO-{zero_stage} checkpoint {ckpt_dir / tag}: {e}") from None


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, tag: str | None = None,
                      overwrite: bool = False) -> Path:
    """Write the consolidated model of RUN_DIR's checkpoint ``tag`` (default latest) to ``out_dir``."""
    from ds_mtp.model import MTPModel, save_exported
    from ds_mtp.pipeline import pipeline_state_dict
    from ds_mtp.run_dir import CONFIG_FILE, RunDir, read_saved_config

    paths, out_dir = RunDir(run_dir), Path(out_dir)
    run_dir = paths.path
    if not paths.config.is_file():
        raise UserError(f"{run_dir} is not a ds-mtp run directory (no {CONFIG_FILE})")
    if (out_dir / "model.safetensors").exists() and not overwrite:
        raise UserError(f"{out_dir} already holds an exported model: choose another --out, or pass --overwrite")
    cfg = config_from_dict(read_saved_config(paths))
    ckpt_dir = paths.checkpoints
    tag = checkpoint_tag(ckpt_dir, tag)
    client = _client_state(ckpt_dir / tag)
    t = cfg.train
    if t.pipeline_stages > 1:
        state, layout = pipeline_state_dict(ckpt_dir / tag, cfg.model.n_layer), f"pipeline-{t.pipeline_stages}"
    else:
        state, layout = zero_state_dict(ckpt_dir, tag, t.zero_stage, client), f"zero-{t.zero_stage}"
    pad_id = client.get("pad_id")
    if "pad_id" not in client:  # checkpoints written before the pad id was part of the client state
        from ds_mtp.data import read_meta

        pad_id = read_meta(cfg.data.path).special_ids.get("pad")
    model = MTPModel(cfg.model, cfg.objective, pad_id)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {ckpt_dir / tag} does not match the run's model config "
                        f"(missing: {', '.join(missing) or '-'}; unexpected: {', '.join(unexpected) or '-'})")
    return save_exported(model, model.state_dict(), out_dir,
                         extra={"data": cfg.data.__dict__,
                                "source": {"run_dir": str(run_dir), "tag": tag, "step": client.get("step"),
                                           "layout": layout}})
