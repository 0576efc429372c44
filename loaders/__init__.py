"""The training-side reader of tokenmill datasets (no Beam; torch only for TorchTokenDataset)."""
from tokenmill.loaders.dataset import DatasetMismatchError, TokenReader

__all__ = ["DatasetMismatchError", "TokenReader", "TorchTokenDataset"]


def __getattr__(name: str):
    if name == "TorchTokenDataset":  # imported on first use: torch is heavy and optional
        from tokenmill.loaders.torch_dataset import TorchTokenDataset

        return TorchTokenDataset
    raise AttributeError(name)
