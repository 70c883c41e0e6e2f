"""Serving replicas: an OpenAI-compatible HTTP API over a batching engine.

A replica answers `/v1/completions`, `/v1/chat/completions` (streaming too) and
`/v1/models`, emits a `GenerationEvent` per response to `generations.v1`, follows
`model-updates.v1` and swaps new weights in between batches, and reports the version it
serves on `replica-status.v1`. Importing this package does not import torch.
"""
