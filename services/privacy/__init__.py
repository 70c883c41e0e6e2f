"""Privacy: PII redaction of free text (`redact`), the forget set of users whose data must
not be trained on (`forget`), and the settings both read (`settings`).

Pure functions here; the sink (ClickHouse rows), the stream worker (samples.v1) and
`rlfeed forget` call them.
"""
