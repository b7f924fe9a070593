"""download_kitti against a loopback HTTP server serving zips the tests build from a synthetic tree."""
import http.server
import io
import threading
import zipfile
from pathlib import Path

import pytest

from data_preprocessing import download_kitti
from segmentation import UserError

COUNTS = {"training/image_2": 10, "training/semantic": 10, "testing/image_2": 2}


def zip_of(tree: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(tree.rglob("*.png")):
            archive.write(path, path.relative_to(tree).as_posix())
    return buffer.getvalue()


class Server:
    """Serves ``body`` at /data_semantics.zip; ``declared`` may claim more bytes than are sent (a dropped link)."""

    def __init__(self, body: bytes, declared: int | None = None):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(declared or len(body)))
                self.end_headers()
                self.wfile.write(body)
                outer.requests += 1

            def log_message(self, *args):
                pass

        self.requests = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data_semantics.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def archive_bytes(synthetic_root) -> bytes:
    return zip_of(synthetic_root)


def test_download_extracts_checks_the_layout_and_leaves_no_part_file(tmp_path, archive_bytes):
    with Server(archive_bytes) as server:
        root = download_kitti(tmp_path / "kitti", server.url, COUNTS)
        assert len(list((root / "training" / "semantic").glob("*.png"))) == 10
        assert (root / "data_semantics.zip").is_file() and not list(root.glob("*.part"))
        requests = server.requests
        download_kitti(root, server.url, COUNTS)  # complete tree: nothing fetched again
        assert server.requests == requests


@pytest.mark.parametrize("declared_extra", [0, 1000], ids=["short-file", "dropped-connection"])
def test_truncated_download_is_refused_and_deleted(tmp_path, archive_bytes, declared_extra):
    body = archive_bytes[: len(archive_bytes) // 2]
    with Server(body, declared=len(body) + declared_extra) as server:
        with pytest.raises(UserError, match="truncated or corrupt|failed"):
            download_kitti(tmp_path, server.url, COUNTS)
    assert not list(tmp_path.glob("data_semantics.zip*"))  # no half archive that looks complete


def test_archive_with_the_wrong_layout_is_reported(tmp_path, archive_bytes):
    with Server(archive_bytes) as server:
        with pytest.raises(UserError, match="expected"):
            download_kitti(tmp_path, server.url, {**COUNTS, "testing/image_2": 200})


def test_unreachable_server_gives_one_clear_line(tmp_path):
    with Server(b"") as server:
        url = server.url
    with pytest.raises(UserError, match="downloading .* failed.*by hand"):
        download_kitti(tmp_path, url, COUNTS)
