"""A local stand-in for Google Cloud Storage, so that ``gs://`` workdirs are tested without a bucket.

``gcp-storage-emulator`` (pure Python, in memory) serves GCS's JSON API on localhost; gcsfs (epath's backend for
``gs://``) finds it through ``STORAGE_EMULATOR_HOST`` and tensorstore (Orbax's arrays) through
``TENSORSTORE_GCS_HTTP_URL``. One gap is mended here: real GCS sends an object's generation with its bytes
(``x-goog-generation``), which tensorstore needs for its conditional writes, and the emulator does not; it lacks
``moveTo`` (gcsfs' rename, retried for ~30 s before a fallback); and a client that hangs up early is not worth a
traceback.
"""

from __future__ import annotations

import contextlib
import functools
import http
import http.server
import os
import socket
import sys


def _with_generation_headers() -> None:
    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_qk_jax_mended", False):
        return

    def mend(handler):
        def mended(request, response, storage, *args, **kwargs):
            handler(request, response, storage, *args, **kwargs)
            try:
                obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            except Exception:  # noqa: BLE001 -- not found: the handler set the status already
                return
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        return mended

    class QuietServer(http.server.HTTPServer):
        def handle_error(self, request, client_address):  # a client that hung up early (tensorstore does)
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    def run(thread):
        thread._httpd = QuietServer((thread._host, thread._port), functools.partial(server.RequestHandler,
                                                                                     thread._storage))
        thread.is_running.set()
        thread._httpd.serve_forever()

    server.APIThread.run = run
    def move(request, response, storage, *args, **kwargs):  # GCS's moveTo (gcsfs' rename): a copy, then a delete
        request.params["dest_bucket_name"] = request.params["bucket_name"]
        objects.copy(request, response, storage, *args, **kwargs)
        if response.status == http.HTTPStatus.OK:
            storage.delete_file(request.params["bucket_name"], request.params["object_id"])

    mended = {objects.download: mend(objects.download), objects.get: mend(objects.get)}
    moves = tuple((rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                   rf"(?P<dest_object_id>.*[^/]+)$", {"POST": move}) for prefix in (settings.API_ENDPOINT, ""))
    server.HANDLERS = moves + tuple((regex, {method: mended.get(f, f) for method, f in handlers.items()})
                                    for regex, handlers in server.HANDLERS)
    server._qk_jax_mended = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def environment(port: int) -> dict[str, str]:
    """What a process needs to talk to the emulator on ``port`` (also for subprocesses)."""
    url = f"http://localhost:{port}"
    # NO_GCE_CHECK: google-auth would otherwise probe for a GCE metadata server first (seconds per client).
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_CLOUD_PROJECT": "test",
            "NO_GCE_CHECK": "true"}


@contextlib.contextmanager
def serve(bucket: str = "bucket", port: int | None = None):
    """Serve an empty in-memory bucket; yields the port. The caller sets ``environment(port)``."""
    _with_generation_headers()
    from gcp_storage_emulator.server import create_server

    port = port or free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield port
    finally:
        server.stop()


@contextlib.contextmanager
def bucket_environment(host: str, bucket: str = "bucket", **extra: str):
    """Serve an empty ``gs://<bucket>`` and point this process (and the subprocesses it starts) at it while the
    context lasts, with a bucket workdir's host folders (mirror, cache) under ``host``; yields the bucket's URI."""
    import pytest

    with serve(bucket) as port, pytest.MonkeyPatch.context() as patch:
        env = dict(environment(port), QK_JAX_MIRROR=os.path.join(host, "mirror"),
                   XDG_CACHE_HOME=os.path.join(host, "cache"), **extra)
        for key, value in env.items():
            patch.setenv(key, value)
        yield f"gs://{bucket}"


if __name__ == "__main__":  # a server for a test's subprocesses: python tests/gcs_emulator.py PORT BUCKET
    import time

    with serve(sys.argv[2], int(sys.argv[1])):
        print("serving", flush=True)
        while True:
            time.sleep(3600)
