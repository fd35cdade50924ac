"""The shard format's public names in one import (kept for scripts written against earlier versions).

The code lives by job: :mod:`lit_sae.data.shard_format` (bytes of a block), :mod:`lit_sae.data.manifest` (the typed
manifest), :mod:`lit_sae.data.writer` (ShardWriter) and :mod:`lit_sae.data.reader` (tar walking, row ranges).
docs/shard-format.md describes the format.
"""

from lit_sae.data.manifest import (
    Exclusions,
    LMInfo,
    Manifest,
    ShardInfo,
    SourceInfo,
    SplitInfo,
    manifest_location,
    read_manifest,
    validate_manifest,
    write_manifest_atomic,
)
from lit_sae.data.reader import iter_tar
from lit_sae.data.shard_format import (
    DTYPES,
    FORMAT,
    MANIFEST_NAME,
    MEMBERS,
    ShardError,
    ShardNotFoundError,
    block_key,
    decode_block,
    decode_block_arrays,
    from_storage,
    is_url,
    nonfinite_error,
    nonfinite_rows,
    shard_name,
    to_storage,
)
from lit_sae.data.writer import ShardWriter

__all__ = [
    "DTYPES", "FORMAT", "MANIFEST_NAME", "MEMBERS", "Exclusions", "LMInfo", "Manifest", "ShardError",
    "ShardInfo", "ShardNotFoundError", "ShardWriter", "SourceInfo", "SplitInfo", "block_key", "decode_block",
    "decode_block_arrays", "from_storage", "is_url", "iter_tar", "manifest_location", "nonfinite_error",
    "nonfinite_rows", "read_manifest", "shard_name", "to_storage", "validate_manifest", "write_manifest_atomic",
]
