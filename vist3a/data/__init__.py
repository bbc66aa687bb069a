"""Data sources that need no download: procedural multi-view scenes with ground-truth cameras and depth."""

from vist3a.data.procedural import orbit_path, procedural_clip, procedural_clips, random_scene, render_clip

__all__ = ["orbit_path", "procedural_clip", "procedural_clips", "random_scene", "render_clip"]
