"""Preferences and the reward model learned from them, shared by the streams worker and
`rlfeed rewardmodel`: pair mining over settled generations (`mining`), the MiniLM
Bradley-Terry model (`model`, imports torch), batch scoring off the hot path and loading
a published version (`scoring`), held-out figures (`metrics`) and the exploitation guard
(`guard`)."""
