"""rlfeed's Python SDK for product apps: send feedback (and generations, for apps that
serve their own models) to rlfeed, over HTTP to the gateway or straight to Kafka.

    from services.sdk import FeedbackClient

    with FeedbackClient(url="http://gateway:8080", api_key="rlf_...") as client:
        client.feedback(generation_id, "thumb", 1, user_id="u-42")

Events are validated when you call, batched in the background, retried with exponential
backoff (each keeps its event_id, so a retry never doubles a signal) and flushed on
`flush()`, `close()`, leaving the `with` block, or interpreter exit. Importing this module
loads pydantic and the event schemas only; httpx or aiokafka load with the transport.
"""

from services.sdk.client import AsyncFeedbackClient, ClientStats, FeedbackClient, backoff_delay

__all__ = ["AsyncFeedbackClient", "ClientStats", "FeedbackClient", "backoff_delay"]
