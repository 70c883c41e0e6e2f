"""The simulated population: users ask the replicas through the official OpenAI client
and send their feedback through the ingest path, delayed and out of order.

`Population.run(stop)` loops until `stop` is set; `stats` holds per-version figures,
counted by the policy version each answer reports.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable

from openai import APIError, AsyncOpenAI

from schemas.events import FeedbackEvent
from services.logs import event
from services.simulator.behaviour import Habits, draw_habits, react
from services.simulator.preference import Preference
from services.simulator.prompts import PROMPTS
from services.simulator.settings import SimulatorSettings
from services.simulator.stats import VersionStats

log = logging.getLogger("rlfeed.simulator")

SendFeedback = Callable[[FeedbackEvent], Awaitable[None]]


class Population:
    """A fixed population of users with habits, sharing one hidden preference."""

    def __init__(self, settings: SimulatorSettings, preference: Preference, send: SendFeedback) -> None:
        self.settings = settings
        self.preference = preference
        self.send = send
        self.rng = random.Random(settings.sim_seed)
        self.users: list[tuple[str, Habits]] = [
            (f"sim-user-{i:04d}", draw_habits(self.rng, settings.sim_silent_share)) for i in range(settings.sim_users)
        ]
        self.clients = [
            AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="simulated", max_retries=1, timeout=300)
            for url in settings.sim_replica_urls
        ]
        self.stats: dict[int, VersionStats] = defaultdict(VersionStats)
        self.errors = 0
        self.feedback_sent = 0
        self.feedback_ids: set[str] = set()
        self._pending: set[asyncio.Task] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run `sim_concurrency` user loops until `stop` is set, then deliver pending feedback."""
        loops = [asyncio.create_task(self._user_loop(i, stop)) for i in range(self.settings.sim_concurrency)]
        await asyncio.gather(*loops)
        if self._pending:
            await asyncio.wait(self._pending, timeout=2 * self.settings.sim_feedback_delay_max_s + 5)

    async def _user_loop(self, slot: int, stop: asyncio.Event) -> None:
        client = self.clients[slot % len(self.clients)]
        while not stop.is_set():
            user_id, habits = self.rng.choice(self.users)
            prompt = self.rng.choice(PROMPTS)
            try:
                response = await client.chat.completions.create(
                    model=self.settings.sim_model_name,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=self.settings.sim_max_tokens,
                    temperature=self.settings.sim_temperature,
                    user=user_id,
                )
            except (APIError, OSError) as exc:
                self.errors += 1
                event(log, "request_failed", logging.WARNING, error=str(exc)[:300])
                await asyncio.sleep(1.0)
                continue
            extra = response.model_extra or {}
            generation_id = extra.get("generation_id")
            version = int(extra.get("policy_version") or 0)
            completion = response.choices[0].message.content or ""
            p_accept = float(self.preference(prompt, completion))
            accepted, planned = react(
                self.rng,
                p_accept=p_accept,
                habits=habits,
                generation_id=str(generation_id),
                user_id=user_id,
                completion=completion,
                max_delay_s=self.settings.sim_feedback_delay_max_s,
                duplicate_rate=self.settings.sim_duplicate_rate,
            )
            self.stats[version].add(completion, accepted)
            if generation_id is None:
                self.errors += 1
                continue
            for plan in planned:
                task = asyncio.create_task(self._send_later(plan.delay_s, plan.event))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    async def _send_later(self, delay_s: float, feedback: FeedbackEvent) -> None:
        await asyncio.sleep(delay_s)
        try:
            await self.send(feedback)
            self.feedback_sent += 1
            self.feedback_ids.add(feedback.event_id)
        except Exception as exc:  # the ingest path refused or is down: count it, keep going
            self.errors += 1
            event(log, "feedback_failed", logging.WARNING, error=str(exc)[:300])

    def summary(self) -> dict:
        """Per-version figures, oldest version first."""
        return {
            "versions": {str(v): s.summary() for v, s in sorted(self.stats.items())},
            "answers": sum(s.answers for s in self.stats.values()),
            "feedback_sent": self.feedback_sent,
            "feedback_distinct": len(self.feedback_ids),
            "errors": self.errors,
        }
