"""ds-mtp: DeepSpeed pretraining with Multi-Token Prediction and Latent Semantic Enhancement."""

__version__ = "0.1.0"
