"""The training-side reader of tokenmill datasets (no Beam; torch only for TorchTokenDataset)."""
from tokenmill.loaders.dataset import DatasetMismatchError, TokenReader
from tokenmill.loaders.latents import LatentFormat, latents_to_array, latents_to_arrays

__all__ = ["DatasetMismatchError", "LatentFormat", "TokenReader", "TorchTokenDataset", "latents_to_array",
           "latents_to_arrays"]


def __getattr__(name: str):
    if name == "TorchTokenDataset":  # imported on first use: torch is heavy and optional
        from tokenmill.loaders.torch_dataset import TorchTokenDataset

        return TorchTokenDataset
    raise AttributeError(name)
