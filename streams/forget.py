"""Privacy on the samples the join emits: forgotten users' samples are dropped, the text
of the rest is redacted (services/privacy), before anything is produced to samples.v1.

- The forget set is every (tenant_id, user_id) on forget-requests.v1 (compacted, written
  by `rlfeed forget`). `ForgetFollower` reads the topic to its end before the worker joins
  anything, then follows it in a background thread. A sample of a forgotten user is
  dropped and counted (`forgotten_dropped`), not dead-lettered: a dead letter would carry
  the user's data on to dlq.v1 and ClickHouse, which is what forgetting must prevent.
  Preferences mined from it are dropped too (`BatchOutput.outcomes`).
- Ordering: a forget request reaches the worker within one poll of the follower (about a
  second); samples settled before that are already on samples.v1 and in the trainer's
  hands. The join state of pending generations is kept (their samples are dropped when
  they settle) and expires with the usual windows.
- Redaction rewrites `prompt` and `completion` of a sample when the redactor finds
  anything; the token ids stay as they are (the trainer trains on them and needs them to
  match the sampler's logprobs), so redaction protects every reader of the text, not what
  the policy sees. Preferences mined from the settled generation are not redacted here:
  mining compares a user's edit with the completion, and a redacted completion would turn
  an unchanged edit into a preference; their copy in ClickHouse is redacted by the sink.

`apply` is a pure function of the batch output, the forget set and the redactor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import InvalidEvent, decode
from schemas.events import ForgetEvent
from schemas.topics import FORGET_REQUESTS
from services import logs
from services.kafka.security import librdkafka_config
from services.privacy.redact import Redactor, has_digit_bytes
from streams.join import BatchOutput

log = logging.getLogger(__name__)

Pair = tuple[str, str]
"""(tenant_id, user_id)."""

_TENANT = b'"tenant_id":"'
_USER = b'"user_id":"'
_TEXT_START = b'"prompt":"'
_TEXT_END = b'","prompt_token_ids":'


def owner(value: bytes) -> Pair:
    """(tenant_id, user_id) of an encoded sample.

    Ids cannot hold quotes or backslashes (schemas.events.Id), and inside JSON strings
    every quote is escaped, so `"user_id":"` in the bytes is the key itself; the sample's
    top-level user_id is its last occurrence (nested objects have none), tenant_id the first.
    """
    u, t = value.rfind(_USER), value.find(_TENANT)
    if u >= 0 and t >= 0:
        u, t = u + len(_USER), t + len(_TENANT)
        u_end, t_end = value.find(b'"', u), value.find(b'"', t)
        if u_end > 0 and t_end > 0:
            return value[t:t_end].decode(), value[u:u_end].decode()
    obj = orjson.loads(value)
    return obj.get("tenant_id", "default"), obj["user_id"]


def _maybe_pii(value: bytes) -> bool:
    """Whether the sample's text might hold anything to redact (a fast scan of the bytes
    between `prompt` and `prompt_token_ids`; the whole value when they are not found)."""
    start = value.find(_TEXT_START)
    end = value.find(_TEXT_END, start)
    region = value[start:end] if start >= 0 and end > start else value
    return b"@" in region or has_digit_bytes(region)


def redact_sample(value: bytes, redactor: Redactor) -> bytes:
    """The encoded sample with prompt and completion redacted (the same bytes when nothing changed)."""
    if not redactor.custom and not _maybe_pii(value):
        return value
    obj = orjson.loads(value)
    prompt, completion = redactor.text(obj["prompt"]), redactor.text(obj["completion"])
    if prompt == obj["prompt"] and completion == obj["completion"]:
        return value
    obj["prompt"], obj["completion"] = prompt, completion
    return orjson.dumps(obj)


def apply(out: BatchOutput, forgotten: Collection[Pair], redactor: Redactor | None) -> None:
    """Drop forgotten users' samples and outcomes from `out` and redact the rest (in place)."""
    if not forgotten and redactor is None:
        return
    if out.samples:
        kept = []
        for p, key, value in out.samples:
            if forgotten and owner(value) in forgotten:
                out.counts["forgotten_dropped"] += 1
                out.counts["samples"] -= 1
                continue
            if redactor is not None:
                redacted = redact_sample(value, redactor)
                if redacted is not value:
                    out.counts["samples_redacted"] += 1
                value = redacted
            kept.append((p, key, value))
        out.samples = kept
    if out.outcomes and forgotten:
        outcomes = []
        for p, o in out.outcomes:
            if forgotten and (o.tenant_id, o.user_id) in forgotten:
                continue
            outcomes.append((p, o))
        out.outcomes = outcomes


class ForgetFollower:
    """The forget set, read from forget-requests.v1 (every partition, from the start, no
    consumer group) and kept up to date by a daemon thread."""

    def __init__(self, bootstrap: str, settings: object, poll_s: float = 0.5) -> None:
        self.topic = FORGET_REQUESTS.full_name(settings.topic_prefix)  # type: ignore[attr-defined]
        self.pairs: set[Pair] = set()
        self.bad_records = 0
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                **librdkafka_config(bootstrap, settings),
                "group.id": "rlfeed-forget-follower",  # required by librdkafka; never committed
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        self._eof: set[int] = set()
        self._partitions: list[int] = []
        self._assign()
        self._thread = threading.Thread(target=self._run, name="rlfeed-forget", daemon=True)

    def _assign(self) -> None:
        """Assign every partition of the topic from the start (none while it does not exist)."""
        meta = self._consumer.list_topics(self.topic, timeout=10)
        topic = meta.topics.get(self.topic)
        parts = sorted(topic.partitions) if topic is not None and topic.error is None else []
        if parts != self._partitions:
            self._partitions = parts
            self._consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])

    def start(self, load_timeout_s: float) -> ForgetFollower:
        """Read the topic to its end (at most `load_timeout_s`), then follow it in the background."""
        deadline = time.monotonic() + load_timeout_s
        while len(self._eof) < len(self._partitions) and time.monotonic() < deadline:
            self._poll_once(self._poll_s)
        caught_up = len(self._eof) >= len(self._partitions)
        logs.event(
            log,
            "streams.forget_loaded",
            level=logging.INFO if caught_up else logging.WARNING,
            forgotten=len(self.pairs),
            caught_up=caught_up,
        )
        self._thread.start()
        return self

    def _poll_once(self, timeout_s: float) -> None:
        for m in self._consumer.consume(500, timeout_s):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._eof.add(m.partition())
                else:
                    logs.event(log, "streams.forget_consume_error", level=logging.WARNING, error=str(err))
                continue
            if m.value() is None:
                continue  # a tombstone: compaction of a record we already hold
            try:
                ev = decode(ForgetEvent, m.value())
            except InvalidEvent as exc:
                self.bad_records += 1
                logs.event(log, "streams.bad_forget_request", level=logging.WARNING, reason=str(exc)[:200])
                continue
            if (ev.tenant_id, ev.user_id) not in self.pairs:
                self.pairs.add((ev.tenant_id, ev.user_id))
                logs.event(log, "streams.user_forgotten", tenant_id=ev.tenant_id, forgotten=len(self.pairs))

    def _run(self) -> None:
        last_check = time.monotonic()
        while not self._stop.is_set():
            try:
                if not self._partitions and time.monotonic() - last_check > 10.0:
                    last_check = time.monotonic()
                    self._assign()  # the topic did not exist at start; created since?
                self._poll_once(self._poll_s)
            except Exception as exc:  # keep following; the worker must not die of it
                logs.event(log, "streams.forget_follow_failed", level=logging.WARNING, error=repr(exc)[:300])
                time.sleep(1.0)
        self._consumer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        else:
            self._consumer.close()


class SamplePrivacy:
    """What the hot path calls: the forget set (when followed) and the redactor."""

    def __init__(self, follower: ForgetFollower | None, redactor: Redactor | None) -> None:
        self.follower = follower
        self.redactor = redactor

    @classmethod
    def start(cls, bootstrap: str, topic_prefix: str) -> SamplePrivacy:
        """From `PrivacySettings` (RLFEED_REDACT_*, RLFEED_FORGET_*), the follower started."""
        from services.privacy.settings import PrivacySettings

        settings = PrivacySettings(topic_prefix=topic_prefix)
        follower = None
        if settings.forget_enabled:
            follower = ForgetFollower(bootstrap, settings).start(settings.forget_load_timeout_s)
        return cls(follower, Redactor.from_settings(settings))

    def apply(self, out: BatchOutput) -> None:
        """Drop forgotten users' samples from `out`, redact the others' text."""
        apply(out, self.follower.pairs if self.follower is not None else (), self.redactor)

    def status(self) -> dict[str, int]:
        return {"forgotten_users": len(self.follower.pairs) if self.follower is not None else 0}

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
