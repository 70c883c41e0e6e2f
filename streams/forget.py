"""Privacy on the samples the join emits: forgotten users' samples are dropped, the text
of the rest is redacted (services/privacy), before anything is produced to samples.v1.

- The forget set is every (tenant_id, user_id) on forget-requests.v1 (compacted, written
  by `rlfeed forget`). `ForgetFollower` reads the topic to its end before the worker joins
  anything, then catches up with it every `forget_refresh_s` (no consumer stays open). A
  sample of a forgotten user is dropped and counted (`forgotten_dropped`), not
  dead-lettered: a dead letter would carry the user's data on to dlq.v1 and ClickHouse,
  which is what forgetting must prevent.
  Preferences mined from it are dropped too (`BatchOutput.outcomes`).
- Ordering: a forget request reaches the worker within `forget_refresh_s` (10 s by
  default); samples settled before that are already on samples.v1 and in the trainer's
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
    consumer group) and brought up to date by a periodic catch-up.

    Forget requests are rare, so no consumer stays open: every `refresh_s` a daemon thread
    opens one, reads each partition from the last offset seen to its end (the high
    watermark, reported as partition EOF) and closes it. An idle librdkafka consumer is
    not free: on a broker that answers empty fetches at once (the embedded one) the
    persistent follower burned about 6 s of CPU per 10 s idle, the periodic one 0.3 s.
    A request issued while the worker runs takes effect within `refresh_s` (plus the
    catch-up's read).
    """

    def __init__(self, bootstrap: str, settings: object, refresh_s: float = 10.0, poll_s: float = 0.5) -> None:
        self.topic = FORGET_REQUESTS.full_name(settings.topic_prefix)  # type: ignore[attr-defined]
        self.pairs: set[Pair] = set()
        self.bad_records = 0
        self.catch_ups = 0
        self.offsets: dict[int, int] = {}
        """Per partition, the next offset to read (one past the last record seen)."""
        self.refresh_s = refresh_s
        self._poll_s = poll_s
        self._config = {
            **librdkafka_config(bootstrap, settings),
            "group.id": "rlfeed-forget-follower",  # required by librdkafka; never committed
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",  # an offset compacted or deleted away
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlfeed-forget", daemon=True)

    def start(self, load_timeout_s: float) -> ForgetFollower:
        """Read the topic to its end (at most `load_timeout_s`), then catch up every
        `refresh_s` in the background."""
        try:
            caught_up = self.catch_up(load_timeout_s)
        except Exception as exc:  # the worker starts all the same; the thread retries
            logs.event(log, "streams.forget_follow_failed", level=logging.WARNING, error=repr(exc)[:300])
            caught_up = False
        logs.event(
            log,
            "streams.forget_loaded",
            level=logging.INFO if caught_up else logging.WARNING,
            forgotten=len(self.pairs),
            caught_up=caught_up,
        )
        self._thread.start()
        return self

    def catch_up(self, timeout_s: float) -> bool:
        """Open a consumer, read every partition from the last offset seen to its end, and
        close it. Returns whether every partition was read to its end within `timeout_s`
        (a topic that does not exist yet counts as read)."""
        deadline = time.monotonic() + timeout_s
        consumer = Consumer(self._config)
        try:
            meta = consumer.list_topics(self.topic, timeout=max(0.1, min(10.0, timeout_s)))
            topic = meta.topics.get(self.topic)
            parts = sorted(topic.partitions) if topic is not None and topic.error is None else []
            if not parts:
                return True
            consumer.assign([TopicPartition(self.topic, p, self.offsets.get(p, OFFSET_BEGINNING)) for p in parts])
            pending = set(parts)
            while pending and time.monotonic() < deadline:
                for m in consumer.consume(500, min(self._poll_s, max(0.01, deadline - time.monotonic()))):
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            pending.discard(m.partition())
                        else:
                            logs.event(log, "streams.forget_consume_error", level=logging.WARNING, error=str(err))
                        continue
                    self.offsets[m.partition()] = m.offset() + 1
                    self.take(m.value())
            self.catch_ups += 1
            return not pending
        finally:
            consumer.close()

    def take(self, value: bytes | None) -> None:
        """Add the pair of one forget-requests.v1 record (a bad one is counted and logged)."""
        if value is None:
            return  # a tombstone: compaction of a record we already hold
        try:
            ev = decode(ForgetEvent, value)
        except InvalidEvent as exc:
            self.bad_records += 1
            logs.event(log, "streams.bad_forget_request", level=logging.WARNING, reason=str(exc)[:200])
            return
        if (ev.tenant_id, ev.user_id) not in self.pairs:
            self.pairs.add((ev.tenant_id, ev.user_id))
            logs.event(log, "streams.user_forgotten", tenant_id=ev.tenant_id, forgotten=len(self.pairs))

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.catch_up(max(self.refresh_s, 5.0))
            except Exception as exc:  # keep following; the worker must not die of it
                logs.event(log, "streams.forget_follow_failed", level=logging.WARNING, error=repr(exc)[:300])

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(15.0)


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
            follower = ForgetFollower(bootstrap, settings, settings.forget_refresh_s).start(
                settings.forget_load_timeout_s
            )
        return cls(follower, Redactor.from_settings(settings))

    def apply(self, out: BatchOutput) -> None:
        """Drop forgotten users' samples from `out`, redact the others' text."""
        apply(out, self.follower.pairs if self.follower is not None else (), self.redactor)

    def status(self) -> dict[str, int]:
        return {"forgotten_users": len(self.follower.pairs) if self.follower is not None else 0}

    def stop(self) -> None:
        if self.follower is not None:
            self.follower.stop()
