"""TextEncoder deployment: a thin Serve wrapper with dynamic batching over encoders.TextEncoder."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from ray import serve

from deployments import metrics
from deployments.core import encoders
from deployments.core.settings import BatchingSettings, TextModelSettings


@serve.deployment
class TextEncoder:
    """Embeds strings; concurrent requests are batched into one model call."""

    def __init__(
        self, model: TextModelSettings, batching: BatchingSettings, num_threads: int
    ) -> None:
        self.encoder = encoders.TextEncoder(model, num_threads=num_threads)
        self._embed_batch.set_max_batch_size(batching.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def dim(self) -> int:
        """Vector dimension of the model."""
        return self.encoder.dim

    def model_id(self) -> str:
        """What made this replica's vectors (deployments.core.versions.text_model_id)."""
        return self.encoder.model_id

    def model_settings(self) -> TextModelSettings:
        """The settings this replica's model was built from (recorded as provenance)."""
        return self.encoder.settings

    async def embed(self, text: str) -> np.ndarray:
        """One L2-normalised vector for a string."""
        return await self._embed_batch((text, time.monotonic()))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, items: list[tuple[str, float]]) -> list[np.ndarray]:
        metrics.observe_batch("text", [enqueued for _, enqueued in items])
        return list(await asyncio.to_thread(self.encoder.embed, [text for text, _ in items]))
