"""Feast's file registry, written atomically.

Feast's `FileRegistryStore` rewrites `registry.db` in place (open "wb", write). A reader in
another process (the prediction API, a training run beside a materialization in a Luigi
run with several workers) can open it between the truncation and the write, and fail to
parse it or find no feature views. This store writes a temporary file in the same folder
and renames it over the registry, so a reader sees the old registry or the new one, whole.
`feature_store.yaml` selects it with `registry_store_type`.
"""

from __future__ import annotations

import os
import tempfile
import uuid

from feast.infra.registry.file import FileRegistryStore
from feast.protos.feast.core.Registry_pb2 import Registry as RegistryProto
from feast.utils import _utc_now


class AtomicFileRegistryStore(FileRegistryStore):
    """A file registry that is replaced by rename, never rewritten in place."""

    def _write_registry(self, registry_proto: RegistryProto) -> None:
        registry_proto.version_id = str(uuid.uuid4())
        registry_proto.last_updated.FromDatetime(_utc_now())
        folder = self._filepath.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self._filepath.name}.", dir=folder)
        try:
            # mkstemp makes the file owner-only; keep the registry's mode (an API running as
            # another user reads it), or a plain file's for a new one.
            try:
                mode = self._filepath.stat().st_mode & 0o777
            except FileNotFoundError:  # a plain new file's mode: what the umask allows
                mask = os.umask(0o077)
                os.umask(mask)
                mode = 0o666 & ~mask
            os.fchmod(fd, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(registry_proto.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._filepath)
        except BaseException:
            os.unlink(tmp)
            raise
