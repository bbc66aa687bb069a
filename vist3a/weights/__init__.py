"""Released and our own weights: where they are (local, s3://, hub), whether they are complete,
and converters that load released checkpoints into our modules with strict checking."""

from vist3a.weights.check import (
    RELEASES,
    ComponentCheck,
    WeightsCheck,
    check_weights,
    prepare_weights,
    quick_file_fingerprint,
    weights_provenance,
)
from vist3a.weights.convert import (
    Checkpoint,
    CheckpointMismatchError,
    ConversionReport,
    compare_state,
    find_checkpoint,
    load_pretrained_recon,
    load_recon_state,
    plan_recon,
    resize_pos_embed,
)
from vist3a.weights.locate import (
    Location,
    ManifestMismatchError,
    WeightsError,
    build_manifest,
    resolve,
    s3_cache_path,
    write_manifest,
)

__all__ = [
    "RELEASES",
    "Checkpoint",
    "CheckpointMismatchError",
    "ComponentCheck",
    "ConversionReport",
    "Location",
    "ManifestMismatchError",
    "WeightsCheck",
    "WeightsError",
    "build_manifest",
    "check_weights",
    "compare_state",
    "find_checkpoint",
    "load_pretrained_recon",
    "load_recon_state",
    "plan_recon",
    "prepare_weights",
    "quick_file_fingerprint",
    "resize_pos_embed",
    "resolve",
    "s3_cache_path",
    "weights_provenance",
    "write_manifest",
]
