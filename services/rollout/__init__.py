"""The canary rollout's shared vocabulary (no process of its own).

`arms` encodes per-arm counts and intervals into `RolloutEvent.arms`; `latency` is the
bounded latency histogram replicas report per version and its quantile estimate (the
latency guardrail's input); `control` reads the
current split per model from the compacted rollouts.v1 topic and builds operator events.
The streams worker (the decision), the CLI and the dashboard use it; serving only reads
the split fields of the event.
"""
