"""ds-mtp: DeepSpeed pretraining with Multi-Token Prediction and Latent Semantic Enhancement."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ds_mtp.generate(model, prompts, ...) decodes (ds_mtp/generate.py); imported on first use, so that
    # ``import ds_mtp`` (every CLI command) does not pay for torch.
    if name == "generate":
        import importlib

        return importlib.import_module("ds_mtp.generate")
    raise AttributeError(f"module 'ds_mtp' has no attribute {name!r}")
