"""Model stitching: the Conv3d stitching layer and the stitched 3D decoder."""

from vist3a.stitching.decoder import DecodedScenes, StitchedDecoder, resize_frames
from vist3a.stitching.layer import StitchingLayer, frames_from_latent_frames, upsample_time
from vist3a.stitching.spec import StitchSpec

__all__ = ["DecodedScenes", "StitchedDecoder", "StitchSpec", "StitchingLayer", "frames_from_latent_frames",
           "resize_frames", "upsample_time"]
