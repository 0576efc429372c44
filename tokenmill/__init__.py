"""tokenmill: raw text, image and video shards → Parquet token datasets, with Apache Beam.

The one top-level import name of the distribution. Its subpackages live in the
repository's root folders (pipelines/, transforms/, schemas/, loaders/,
reports/) and install as `tokenmill.pipelines`, `tokenmill.transforms`, ...
(setup.py maps them). The names most users need are exported here, loaded on
first use so that `import tokenmill` stays cheap:

    from tokenmill import TokenReader, TorchTokenDataset, read_manifest, BuildSpec
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TokenReader": "tokenmill.loaders.dataset",
    "TorchTokenDataset": "tokenmill.loaders.torch_dataset",
    "read_manifest": "tokenmill.schemas.manifest",
    "Manifest": "tokenmill.schemas.manifest",
    "BuildSpec": "tokenmill.pipelines.spec",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from tokenmill.schemas.manifest import tokenmill_version

        return tokenmill_version()
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
