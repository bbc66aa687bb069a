"""URIs (local paths and s3://) with atomic writes."""

from vist3a.io.uri import (ensure_writable, exists, filesystem, is_s3, join, read_bytes, read_text, remove_temp_files,
                           write_bytes, write_text)

__all__ = ["ensure_writable", "exists", "filesystem", "is_s3", "join", "read_bytes", "read_text", "remove_temp_files",
           "write_bytes", "write_text"]
