"""`rlfeed train`: the online policy-gradient trainer that consumes samples.v1 and
publishes gated, checkpointed versions on model-updates.v1."""
