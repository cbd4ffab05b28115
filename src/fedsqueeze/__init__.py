"""fedsqueeze: federated fine-tuning of pre-trained models at a tiny communication cost."""

__version__ = "0.1.0"
