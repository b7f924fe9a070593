"""Fetch KITTI's ``data_semantics.zip`` and extract it, never leaving a half archive that looks complete.

KITTI publishes no checksum for the archive, so integrity is checked twice: every member's CRC-32 inside
the zip (``ZipFile.testzip``; a truncated download has no central directory and fails to open), then the
file counts of the extracted layout.
"""
from __future__ import annotations

import os
import urllib.error
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from torchvision.datasets.utils import download_url, extract_archive

from errors import UserError

KITTI_URL = "https://s3.eu-central-1.amazonaws.com/avg-kitti/data_semantics.zip"
KITTI_COUNTS = {"training/image_2": 200, "training/semantic": 200, "testing/image_2": 200}


def _count_png(root: Path, counts: dict[str, int]) -> dict[str, int]:
    return {sub: len(list((root / sub).glob("*.png"))) for sub in counts}


def verify_zip(path: Path) -> None:
    """Raise UserError (and delete the file) unless it is a complete zip whose every member passes its CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        bad_member = f"({error})"
    if bad_member is not None:
        path.unlink(missing_ok=True)
        raise UserError(f"{path}: download is truncated or corrupt at {bad_member}; it was deleted, run --download again")


def download_kitti(root: str | Path, url: str = KITTI_URL, expected_counts: dict[str, int] = KITTI_COUNTS) -> Path:
    """Download (atomically: ``.part`` then rename after verification), extract into ``root``, check the layout."""
    root = Path(root)
    if _count_png(root, expected_counts) == expected_counts:
        return root
    archive = root / Path(urlparse(url).path).name
    if archive.is_file():
        verify_zip(archive)
    else:
        part = archive.with_name(archive.name + ".part")
        part.unlink(missing_ok=True)  # torchvision would take any existing file as complete
        try:
            download_url(url, str(root), part.name)
        except (urllib.error.URLError, OSError, RuntimeError) as error:
            part.unlink(missing_ok=True)
            raise UserError(f"downloading {url} failed ({error}); check the connection, or download the file "
                            f"by hand to {archive} and run again") from None
        verify_zip(part)
        os.replace(part, archive)
    extract_archive(str(archive), str(root))
    found = _count_png(root, expected_counts)
    if found != expected_counts:
        raise UserError(f"{archive} extracted to {root} with {found} PNG files, expected {expected_counts}; "
                        f"delete {archive} and run --download again")
    return root
