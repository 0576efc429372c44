"""A Beam ModelHandler for the neural tokenizer families (torchscript:, export:, and any family whose
tokenizer has `encode_images` / `encode_clips`), for pipelines that use RunInference.

tokenmill's own builds do not use it: they encode whole decoded blocks in one
DoFn (transforms/tokenize.py), which keeps blocks (shard names, error rows)
without a regrouping shuffle, and was no slower, with no more memory, on the
same images and model (docs/architecture.md and docs/benchmarks.md, "Neural
encoders: blocks or RunInference"; bench/neural_inference.py). It is here for
users who compose their own Beam pipeline, and it is what that benchmark runs.

    images | RunInference(KeyedModelHandler(NeuralModelHandler("export:enc.pt2", "image")))

Each element is one decoded uint8 image (H, W, 3) or clip (T, H, W, 3);
BatchElements groups up to --batch-size of them, and the tokenizer buckets
each batch by padded shape (neural.py), so mixed sizes are fine. A failing
model call does not raise: its items' PredictionResult.inference is the
exception, to be turned into error rows downstream.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult


class NeuralModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Loads a tokenizer spec once per process (or once per machine with `share_across_processes`, Beam's
    multi_process_shared: the model then runs in its own process and batches travel to it pickled)."""

    def __init__(self, spec: str, modality: str, options: dict[str, Any] | None = None,
                 share_across_processes: bool = False):
        self._spec, self._modality, self._options = spec, modality, dict(options or {})
        self._share = share_across_processes
        self._batch_size = int(self._options.get("batch_size", 8))

    def load_model(self) -> Any:
        from tokenmill.transforms.registry import shared_tokenizer

        # The process's own copy where it has one (a launcher that loaded it before forking its workers).
        return shared_tokenizer(self._spec, self._modality, tuple(sorted(self._options.items())))

    def run_inference(self, batch: Sequence[np.ndarray], model: Any,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        items = list(batch)
        results = model.encode_images(items) if self._modality == "image" else model.encode_clips(items)
        return [PredictionResult(x, r) for x, r in zip(items, results)]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return "tokenmill"

    def batch_elements_kwargs(self) -> dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}

    def share_model_across_processes(self) -> bool:
        return self._share
