"""The generation ⋈ feedback join and its rewards (`rlfeed streams`).

- `streams.join`: pure per-partition state transitions over a batch of records.
- `streams.rewards`: the reward-function registry and the composite reward.
- `streams.changelog`: (de)serialisation of join state for the compacted changelog.
- `streams.hot_path`: the confluent-kafka loop, run as a Faust `Service`.
- `streams.app`: the Faust app (lifecycle, low-rate agents, web view).
- `streams.worker`: the `rlfeed streams` entry point.
"""
