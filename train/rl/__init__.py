"""Reinforcement learning with verifiable rewards: GRPO (DeepSeekMath, DeepSeek-R1) on this project's model."""
