"""Model stitching: the Conv3d stitching layer and the stitched 3D decoder."""

from vist3a.stitching.checkpoint import load_stitch_checkpoint, read_stitch_checkpoint, save_stitch_checkpoint
from vist3a.stitching.decoder import DecodedScenes, StitchedDecoder
from vist3a.stitching.layer import StitchingLayer, frames_from_latent_frames, upsample_time
from vist3a.stitching.spec import StitchSpec

__all__ = ["DecodedScenes", "StitchedDecoder", "StitchSpec", "StitchingLayer", "frames_from_latent_frames",
           "load_stitch_checkpoint", "read_stitch_checkpoint", "save_stitch_checkpoint", "upsample_time"]
