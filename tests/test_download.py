"""Downloads against a loopback HTTP server (resume, retries, corruption, disk space) and safe extraction."""

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import pytest

from cribo.data import download as dl
from cribo.data.download import DownloadError, download
from cribo.data.extract import UnsafeArchiveError, extract

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class _Server:
    """Serves ``files`` on 127.0.0.1 with Range support; can cut the first transfer or fail with 500."""

    def __init__(self, files):
        self.files, self.requests = files, []
        self.cut_after, self.fail_500 = None, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                if server.fail_500:
                    server.fail_500 -= 1
                    self.send_error(500)
                    return
                data = server.files.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None:
                    self.wfile.write(body[: server.cut_after])
                    server.cut_after = None
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the transfer dies mid-way
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server({"data.bin": PAYLOAD})
    yield s
    s.close()


MD5 = "md5:" + hashlib.md5(PAYLOAD).hexdigest()
SHA = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()


def test_full_download_verified_with_md5_and_sha256(server, tmp_path):
    for checksum in (MD5, SHA):
        out = download(f"{server.url}/data.bin", tmp_path / checksum[:3] / "data.bin", checksum=checksum,
                       progress=False)
        assert out.read_bytes() == PAYLOAD
    # file URL, same function
    src = tmp_path / "src.bin"
    src.write_bytes(PAYLOAD)
    assert download(src.as_uri(), tmp_path / "f" / "data.bin", checksum=MD5, progress=False).read_bytes() == PAYLOAD


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    server.cut_after = 30_000
    out = download(f"{server.url}/data.bin", tmp_path / "data.bin", checksum=MD5, backoff=0, progress=False)
    assert out.read_bytes() == PAYLOAD
    assert server.requests[0]["range"] is None
    assert server.requests[1]["range"] == "bytes=30000-"  # only the rest was asked for


def test_existing_part_file_is_resumed_and_existing_file_skips_the_network(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    download(f"{server.url}/data.bin", tmp_path / "data.bin", size=len(PAYLOAD), checksum=SHA, progress=False)
    assert server.requests == [{"path": "/data.bin", "range": "bytes=1000-"}]
    download(f"{server.url}/data.bin", tmp_path / "data.bin", checksum=SHA, progress=False)
    assert len(server.requests) == 1


def test_server_errors_are_retried_and_client_errors_are_not(server, tmp_path):
    server.fail_500 = 2
    download(f"{server.url}/data.bin", tmp_path / "data.bin", checksum=MD5, backoff=0, progress=False)
    assert len(server.requests) == 3
    server.requests.clear()
    with pytest.raises(DownloadError, match=r"missing.bin failed: HTTP 404"):
        download(f"{server.url}/missing.bin", tmp_path / "m.bin", backoff=0, progress=False)
    assert len(server.requests) == 1
    server.fail_500 = 10
    with pytest.raises(DownloadError, match="after 3 attempts"):
        download(f"{server.url}/data.bin", tmp_path / "x.bin", retries=2, backoff=0, progress=False)


def test_corrupted_download_is_removed_and_reported(server, tmp_path):
    wrong = "md5:" + "0" * 32
    with pytest.raises(DownloadError, match=r"data.bin .* is corrupt: md5 [0-9a-f]{32}, expected 0{32}"):
        download(f"{server.url}/data.bin", tmp_path / "data.bin", checksum=wrong, progress=False)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    with pytest.raises(DownloadError, match="has 102400 bytes, expected 5"):
        download(f"{server.url}/data.bin", tmp_path / "data.bin", size=5, progress=False)


def test_insufficient_disk_space_stops_before_writing(server, tmp_path, monkeypatch):
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(DownloadError, match=f"not enough free disk space in {tmp_path}"):
        download(f"{server.url}/data.bin", tmp_path / "data.bin", progress=False)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- extraction


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/cribo-evil.txt", "a/../../evil.txt"])
def test_tar_escaping_its_folder_is_refused(tmp_path, evil):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_tar_bytes({"ok.txt": b"fine", evil: b"gotcha"}))
    with pytest.raises(UnsafeArchiveError, match="bad.tar.gz"):
        extract(archive, tmp_path / "out" / "dest")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not (tmp_path / "out" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_zip_escaping_its_folder_is_refused_before_writing(tmp_path, evil):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("first.txt", b"written first in the archive")
        z.writestr(evil, b"gotcha")
    with pytest.raises(UnsafeArchiveError, match=f"member '{evil}'"):
        extract(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists() and not (tmp_path / "dest.partial").exists()
    assert not (tmp_path / "evil.txt").exists()


def test_zip_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract(archive, tmp_path / "dest")


def test_normal_archives_extract_and_merge(tmp_path):
    tgz = tmp_path / "a.tgz"
    tgz.write_bytes(_tar_bytes({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    extract(tgz, tmp_path / "dest")
    assert (tmp_path / "dest/top/sub/y.txt").read_bytes() == b"y"
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("other/z.txt", b"z")
    extract(z, tmp_path / "dest")  # merged next to the tar's folder
    assert (tmp_path / "dest/other/z.txt").read_bytes() == b"z" and (tmp_path / "dest/top/x.txt").is_file()
    with pytest.raises(ValueError, match="supported suffixes"):
        extract(tmp_path / "c.rar", tmp_path / "dest")
