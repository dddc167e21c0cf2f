"""Where data enters, and secrets (issue #19, items 8 and 9).

8 — credentials and signatures in URLs (a URI list's `http://user:pass@…`, a presigned `X-Amz-Signature`,
    `--root s3://KEY:SECRET@bucket/run`) are used for the fetch and appear in nothing stored, printed or
    reported; sample ids stay content hashes.
9 — every entry of a source is a sample or a reject, whatever its type, name, size or permission; nothing
    is read before it is known to be a regular file of a sane size; a URL that never answers costs
    `corpus.timeout` × attempts, then is a reject saying so.

Real files, a real HTTP server thread, moto's S3 server, the shard stage run inline.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import stages.report
import stages.shard
from bench.kit.configs import raw_config
from bench.kit.faults import with_root
from bench.kit.images import image_bytes, write_sources
from bench.kit.s3 import moto_s3
from pipeline.config import load_config
from pipeline.lineage import Lineage
from pipeline.redact import public, redact
from pipeline.storage import Root

SECRETS = ("s3cretPass", "deadbeefsig", "AKIAPRESIGNED", "tok3n")


# -- helpers ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def http_server(files: dict[str, bytes], user: str | None = None, password: str | None = None):
    """A real HTTP server on 127.0.0.1 serving `files` (path → bytes; query strings ignored), requiring
    Basic auth for paths under /private/. Yields (base URL, list of Authorization headers received)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            seen.append(self.headers.get("Authorization") or "")
            want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if path.startswith("/private/") and self.headers.get("Authorization") != want:
                self.send_response(401)
                self.end_headers()
                return
            if path not in files:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[path])))
            self.end_headers()
            if body:
                self.wfile.write(files[path])

        def do_GET(self):
            self._serve(True)

        def do_HEAD(self):
            self._serve(False)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def silent_server():
    """Accepts every connection and never answers. Yields (port, list of accepted sockets)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(sock.accept()[0])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(2)
        for s in accepted:
            s.close()
        sock.close()


def shard(raw: dict) -> dict:
    return stages.shard.run(load_config(raw=raw))


def tables(root: Path) -> tuple[dict, dict]:
    """(manifest: source_uri → sample_id, rejects: source_uri → reason) of a sharded root."""
    r = Root(str(root))
    manifest = {m["source_uri"]: m["sample_id"] for m in r.read_table("corpus", "manifest.parquet").to_pylist()}
    rejects = {m["source_uri"]: m["reason"] for m in r.read_table("corpus", "rejects.parquet").to_pylist()}
    return manifest, rejects


def files_containing(folder: Path, needles) -> list[str]:
    """Every file under `folder` whose bytes contain one of `needles` (checked raw, so Parquet and JSON count)."""
    hits = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(folder)}: {n}" for n in needles if n.encode() in data]
    return hits


# -- item 8: credentials and signatures -------------------------------------------------------------

def test_redact_is_the_one_rule_for_credentials_and_signatures():
    presigned = ("https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F1"
                 "&X-Amz-Date=20250101T000000Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Signature=ff00")
    assert redact(presigned) == "https://b.s3.amazonaws.com/k.jpg"  # every signing of one object: one URI
    assert redact("s3://AKIA:wJal/K7M+x/y@bucket/run") == "s3://bucket/run"  # AWS secrets hold '/' and '+'
    assert redact("http://u:p@ss@host/x?a=1&sig=2&b=3") == "http://host/x?a=1&b=3"
    assert redact("https://h/a.tar?token=1#m.jpg") == "https://h/a.tar#m.jpg"
    assert redact("error: cannot open 'http://a:b@h/x' (404)") == "error: cannot open 'http://h/x' (404)"
    for plain in ("http://host:8080/img/a@2x.jpg", "/data/odd name #1 é.jpg", "ray://head:10001", "org/m@abc"):
        assert redact(plain) == plain  # credential-free URIs (and so their sample ids, listings) are unchanged
    assert public("/d/bad\udcff\nname.jpg") == "/d/bad\\xff\\x0aname.jpg"
    from pipeline.models import display

    assert display("s3://KEY:SECRET@bucket/m.onnx?token=1") == "s3://bucket/m.onnx"  # models use the same rule


@pytest.mark.timeout(180)
def test_url_list_credentials_are_used_for_the_fetch_and_never_stored(tmp_path, ray_session):
    """Listed and sharded by Ray tasks: the real URIs travel to them in memory, the stored ones are public."""
    src = write_sources(tmp_path / "src", n=3)
    blobs = {f"/private/{p.name}": p.read_bytes() for p in sorted(src.iterdir())}
    plain = image_bytes(64, 64, "png", seed=77)
    with http_server({**blobs, "/pub/p.png": plain}, user="alice", password="s3cretPass") as (base, seen):
        host = base.removeprefix("http://")
        lines = [f"http://alice:s3cretPass@{host}{path}" for path in blobs]
        lines += [f"{base}/pub/p.png?X-Amz-Credential=AKIAPRESIGNED&X-Amz-Signature=deadbeefsig&v=2",
                  f"http://alice:s3cretPass@{host}/private/missing.jpg?token=tok3n"]
        (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
        raw = raw_config(tmp_path / "root", tmp_path / "urls.txt", shard_size=2, executor="ray")
        summary = shard(raw)
        assert summary["samples"] == 4 and summary["rejects"] == 1
        manifest, rejects = tables(tmp_path / "root")
        # the fetch used the credentials (the server refuses /private/ without them) ...
        assert any(h.startswith("Basic ") for h in seen)
        # ... stored URIs are the public ones, ids the content hashes a credential-free URI gets
        want = {f"{base}{path}": hashlib.sha256(data).hexdigest()[:16] for path, data in blobs.items()}
        want[f"{base}/pub/p.png?v=2"] = hashlib.sha256(plain).hexdigest()[:16]
        assert manifest == want
        assert list(rejects) == [f"{base}/private/missing.jpg"] and "404" in rejects[f"{base}/private/missing.jpg"]

        # a resumed run reads the entries it knows only by their public form: the sources are listed again
        root = Root(str(tmp_path / "root"))
        for name in root.listdir("ledger", "shard", "_"):
            if name.startswith(("000001.", "final.")):
                root.remove("ledger", "shard", "_", name)
        assert shard(raw)["written"] == 1
        assert tables(tmp_path / "root")[0] == want

        stages.report.run(load_config(raw=raw))
    assert (tmp_path / "root" / "report" / "index.html").exists()
    assert files_containing(tmp_path / "root", SECRETS) == []  # listing, manifest, rejects, shard JSON, report


@pytest.mark.timeout(120)
def test_root_credentials_are_used_but_never_printed_or_stored(tmp_path):
    pytest.importorskip("moto.server")
    from typer.testing import CliRunner

    from pipeline.cli import app

    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRETKEY"
    url = f"s3://AKIAROOTKEYID:{secret}@dad-creds/run"
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(f'[run]\nroot = "/unused"\n[corpus]\nsources = ["{tmp_path / "src"}"]\n')
    for args in ([], ["--json"]):
        res = CliRunner().invoke(app, ["config", "show", "-c", str(cfg_file), "--root", url, *args])
        assert res.exit_code == 0, res.output
        assert "s3://dad-creds/run" in res.output and secret not in res.output and "AKIAROOTKEYID" not in res.output

    src = write_sources(tmp_path / "src", n=2)
    with moto_s3("dad-creds") as fs:
        root = Root(url)
        assert root.url == "s3://dad-creds/run" and secret not in repr(root)
        summary = shard(with_root(raw_config("/unused", src, shard_size=2), url))
        assert summary["samples"] == 2
        stored = b"".join(fs.cat_file(p) for p in fs.find("dad-creds/run"))
        assert b"wJalrXUtnFEMI" not in stored and b"AKIAROOTKEYID" not in stored
        assert b"s3://dad-creds/run" in fs.cat_file("dad-creds/run/dad.toml")
        with pytest.raises(Exception) as err:  # a bucket that does not exist: the error names it, not the key
            Root(f"s3://AKIAROOTKEYID:{secret}@no-such-bucket/run").read_bytes("dad.toml")
        assert "wJalrXUtnFEMI" not in str(err.value) and "AKIAROOTKEYID" not in str(err.value)


# -- item 9: every entry is a sample or a reject --------------------------------------------------------

def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.timeout(120)
def test_every_kind_of_entry_is_a_sample_or_a_reject(tmp_path):
    d = write_sources(tmp_path / "src", n=3)
    good = sorted(d.iterdir())
    sub = d / "sub"
    sub.mkdir()
    shutil.copy(good[0], sub / "copy.jpg")  # a duplicate, one level down
    os.mkfifo(d / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.png"))
    device = False
    with contextlib.suppress(PermissionError, OSError):
        os.mknod(d / "zero.jpg", stat.S_IFCHR | 0o644, os.makedev(1, 5))  # /dev/zero: a read never ends
        device = True
    os.symlink(d / "nowhere.jpg", d / "broken.jpg")
    os.symlink(d / "loop_b.jpg", d / "loop_a.jpg")
    os.symlink(d / "loop_a.jpg", d / "loop_b.jpg")
    os.symlink(d, d / "up")  # a symlink to a parent folder: never walked (it would loop)
    os.symlink(good[1], d / "alias.png")  # a symlink to a regular file is read, as before
    odd = [b"new\nline.png", b"bad\xff\xfe.png", b"tab\tand\x1besc.png"]
    for i, name in enumerate(odd):
        fd = os.open(os.fsencode(d) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, image_bytes(64, 64, "png", seed=300 + i))
        os.close(fd)
    huge = d / "huge.tif"
    with open(huge, "wb") as f:
        f.truncate(6 << 30)  # 6 GiB, sparse: rejected by its size, never read

    rss_before = _maxrss_bytes()
    t0 = time.time()
    summary = shard(raw_config(tmp_path / "root", d, shard_size=2))
    assert time.time() - t0 < 60 and _maxrss_bytes() - rss_before < 1 << 30
    manifest, rejects = tables(tmp_path / "root")

    odd_public = [f"{d}/new\\x0aline.png", f"{d}/bad\\xff\\xfe.png", f"{d}/tab\\x09and\\x1besc.png"]
    pair = {f"{d}/alias.png", str(good[1])}  # a symlink and its target: one sample, one duplicate
    (kept,), (dup,) = pair & set(manifest), pair - set(manifest)
    assert rejects[dup] == f"duplicate of {kept}"
    expect = {
        f"{d}/fifo.jpg": "not a regular file (a FIFO)",
        f"{d}/sock.png": "not a regular file (a socket)",
        f"{d}/broken.jpg": "broken symlink",
        f"{d}/loop_a.jpg": "symlink loop",
        f"{d}/loop_b.jpg": "symlink loop",
        f"{d}/up": "symlink to a folder",
        str(huge): "file too large: 6442450944 bytes",
        f"{sub}/copy.jpg": "duplicate of",
    }
    if device:
        expect[f"{d}/zero.jpg"] = "not a regular file (a character device)"
    for uri, reason in expect.items():
        assert rejects.get(uri, "").startswith(reason), (uri, rejects.get(uri))
    entries = {*map(str, good), f"{d}/alias.png", *odd_public, *expect}  # each exactly once
    assert set(manifest) | set(rejects) == entries and not set(manifest) & set(rejects)
    assert summary["samples"] == len(manifest) == len(good) + len(odd)
    for uri in odd_public:  # names that are not UTF-8 or hold control characters: stored escaped, one line
        assert uri in manifest
    sock.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("as_glob", [False, True], ids=["folder", "deep-glob"])
def test_an_unreadable_subfolder_is_a_reject(tmp_path, as_glob):
    d = write_sources(tmp_path / "src", n=2)
    locked = d / "locked"
    locked.mkdir()
    (locked / "in.png").write_bytes(image_bytes(64, 64, "png", seed=5))
    locked.chmod(0)
    raw = raw_config(tmp_path / "root", f"{d}/**/*.png" if as_glob else d, shard_size=2)
    try:
        if not os.access(locked, os.R_OK):
            shard(raw)
        else:  # root reads anyway: run the stage without the capabilities that let it (setpriv), or skip
            if os.geteuid() != 0 or not shutil.which("setpriv"):
                pytest.skip("this user can read a mode-000 folder and setpriv is unavailable")
            drop = "-dac_override,-dac_read_search"
            code = ("import json; import stages.shard as s; from pipeline.config import load_config; "
                    f"s.run(load_config(raw=json.loads({json.dumps(json.dumps(raw))})))")
            res = subprocess.run(["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", sys.executable, "-c", code],
                                 cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=100,
                                 check=False)
            assert res.returncode == 0, res.stderr[-2000:]
    finally:
        locked.chmod(0o755)
    manifest, rejects = tables(tmp_path / "root")
    assert rejects[str(locked)].startswith("unreadable folder (PermissionError"), rejects
    assert "fix its permissions" in rejects[str(locked)]
    assert len(manifest) == 2


@pytest.mark.timeout(120)
def test_a_url_that_never_answers_costs_the_timeout_per_attempt_then_is_a_reject(tmp_path):
    src = write_sources(tmp_path / "src", n=2)
    with silent_server() as (port, accepted):
        url = f"http://127.0.0.1:{port}/never.jpg"
        (tmp_path / "urls.txt").write_text(f"{url}\n" + "".join(f"{p}\n" for p in sorted(src.iterdir())))
        runs = {}
        for retries in (0, 2):
            raw = raw_config(tmp_path / f"root{retries}", tmp_path / "urls.txt", shard_size=2)
            raw["corpus"].update(timeout=0.5, retries=retries)
            before, t0 = len(accepted), time.time()
            summary = shard(raw)
            runs[retries] = (time.time() - t0, len(accepted) - before)
            manifest, rejects = tables(tmp_path / f"root{retries}")
            assert summary["samples"] == 2 and len(manifest) == 2
            assert rejects == {url: f"timed out: no answer within corpus.timeout = 0.5 s "
                                    f"({retries + 1} attempt(s), corpus.retries = {retries})"}
    (t0, c0), (t2, c2) = runs[0], runs[2]
    assert c0 >= 1 and c2 == 3 * c0, runs  # every attempt asked again, as many times as configured
    assert t2 < 3 * 0.5 * c0 + 5 + 10, runs  # bounded by the timeout (+ backoff, + slack for a loaded machine)


def test_fetch_settings_and_credentials_change_no_fingerprint(tmp_path):
    """corpus.timeout / retries say how inputs are fetched, not what is made of them; rotated credentials
    or a fresh presigning name the same object: the corpus stays complete and is not redone."""
    src = write_sources(tmp_path / "src", n=2)
    raw = raw_config(tmp_path / "root", src, shard_size=2)
    first = shard(raw)
    raw["corpus"].update(timeout=5.0, retries=0)
    again = shard(raw)
    assert again["written"] == 0 and again["fingerprint"] == first["fingerprint"]
    a = load_config(raw={"run": {"root": "s3://K1:S1@b/r"}, "corpus": {"sources": ["https://h/l.txt?X-Amz-Signature=1"]}})
    b = load_config(raw={"run": {"root": "s3://K2:S2@b/r"}, "corpus": {"sources": ["https://h/l.txt?X-Amz-Signature=2"]}})
    assert Lineage(a).shard == Lineage(b).shard
    assert "S1" not in a.to_toml() and "https://h/l.txt" in a.to_toml()
