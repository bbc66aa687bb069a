"""Reward terms for fine-tuning the video generator through the stitched 3D decoder."""

from vist3a.rewards.clip import ClipScorer, write_tiny_clip
from vist3a.rewards.scene import consistency_reward, coverage, depth_agreement, oversized_scales, representation_reward

__all__ = ["ClipScorer", "consistency_reward", "coverage", "depth_agreement", "oversized_scales", "representation_reward",
           "write_tiny_clip"]
