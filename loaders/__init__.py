"""The training-side reader of tokenmill datasets (no Beam)."""
from loaders.dataset import DatasetMismatchError, TokenReader, TorchTokenDataset

__all__ = ["DatasetMismatchError", "TokenReader", "TorchTokenDataset"]
