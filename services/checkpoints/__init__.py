"""The checkpoint store and the lossless delta codec, shared by the trainer and the
serving replicas: versions of a model's weights as full safetensors snapshots or deltas
against an earlier version, every artifact checksummed, under a local directory or any
fsspec URL (`s3://bucket/prefix` on S3-compatible storage, `memory://` in tests)."""
