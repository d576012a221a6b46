"""A GCS emulator on 127.0.0.1 for the gs:// tests: `gcp-storage-emulator` (PyPI), in memory,
in the test process, with the generation preconditions that tensorstore needs.

tensorstore (Orbax's array writes: an OCDBT database whose manifest is updated by
compare-and-swap) sends `ifGenerationMatch` on writes and `ifGenerationNotMatch` on reads and
reads an object's generation from the `x-goog-generation` header of a download. The emulator
(2026.7.19) ignores both parameters and sends no such header, so checkpoint writes fail with
"Malformed StorageGeneration"; `start()` wraps its object handlers to honour them (412 / 304,
atomically under one lock) and to send the header, as GCS does.

Client configuration (`start()` returns it as environment variables):
- gcsfs / google-cloud-storage (etils.epath's gs:// backend with `EPATH_USE_TF=false`):
  `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`
  (else gcsfs asks a gRPC control plane for the bucket type: a 60 s timeout per bucket);
- tensorstore: `TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING=<any>` (a fixed bearer token: no Google credentials).
"""
from __future__ import annotations

import functools
import socket
import threading
from http import HTTPStatus

_LOCK = threading.RLock()


def _generation(storage, bucket: str, name: str) -> int:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return 0


def _object_name(request) -> str | None:
    params = request.params or {}
    if params.get("object_id"):
        return params["object_id"]
    if request.query.get("name"):
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict) and isinstance(data.get("meta"), dict):
        return data["meta"].get("name")
    return None


def _with_preconditions(handler):
    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        bucket, name = (request.params or {}).get("bucket_name"), _object_name(request)
        if not bucket or not name:
            return handler(request, response, storage, *args, **kwargs)
        q = request.query
        with _LOCK:
            gen = _generation(storage, bucket, name)
            if "ifGenerationMatch" in q and gen != int(q["ifGenerationMatch"][0]):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            if "ifGenerationNotMatch" in q and gen == int(q["ifGenerationNotMatch"][0]):
                response.status = HTTPStatus.NOT_MODIFIED
                response["x-goog-generation"] = str(gen)
                return None
            out = handler(request, response, storage, *args, **kwargs)
            gen = _generation(storage, bucket, name)
            if gen:
                response["x-goog-generation"] = str(gen)
            return out
    return wrapped


def _patch_handlers() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    targets = {objects.insert, objects.download, objects.get, objects.xml_upload}
    for _, methods in server.HANDLERS:
        for method, fn in list(methods.items()):
            if fn in targets:
                methods[method] = _with_preconditions(fn)
    if objects.insert in targets:       # the router's fallback for uploads without /upload
        objects.insert = _with_preconditions(objects.insert)


def start(bucket: str = "bucket"):
    """(server, environment variables for clients) of an in-memory emulator with `bucket`."""
    from gcp_storage_emulator.server import create_server

    with _LOCK:
        if not getattr(start, "_patched", False):
            _patch_handlers()
            start._patched = True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = dict(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
               GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", EPATH_USE_TF="false",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return server, env
