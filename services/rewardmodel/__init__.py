"""`rlfeed rewardmodel`: the reward model's processes. `train` retrains the MiniLM
Bradley-Terry model from preferences.v1 on a cadence and publishes gated versions on
model-updates.v1; `serve` answers scoring requests over HTTP with the latest version.
The model itself lives in `services/preferences/`, shared with the streams worker."""
