"""segmentation/checkpoint.py: atomic writes, published copies, the background writer, failed writes."""
import threading

import pytest
import torch

from segmentation import UserError
from segmentation.checkpoint import CheckpointWriter, publish_copy, save_checkpoint


def test_a_failed_checkpoint_write_leaves_the_previous_file_and_no_temporary_file(tmp_path, monkeypatch):
    save_checkpoint({"a": torch.zeros(2)}, tmp_path / "last.pt")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="last.pt: No space left on device; free space on that disk; last.pt was "
                                        "not changed; then continue with: python main.py --resume"):
        save_checkpoint({"a": torch.ones(2)}, tmp_path / "last.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(torch.load(tmp_path / "last.pt")["a"], torch.zeros(2))


def test_best_is_published_without_a_second_write_and_survives_the_next_last(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    publish_copy(tmp_path / "last.pt", tmp_path / "best.pt")
    assert (tmp_path / "best.pt").stat().st_ino == (tmp_path / "last.pt").stat().st_ino  # a link, not a copy
    save_checkpoint({"epoch": 2}, tmp_path / "last.pt")
    assert torch.load(tmp_path / "best.pt")["epoch"] == 1 and torch.load(tmp_path / "last.pt")["epoch"] == 2


def test_background_writer_saves_the_state_as_it_was_when_submitted(tmp_path):
    weights, history = torch.zeros(1000), [{"epoch": 1}]
    writer = CheckpointWriter()
    writer.submit({"model": weights, "history": history}, tmp_path / "last.pt", best=tmp_path / "best.pt")
    weights += 1  # training goes on while the file is written
    history.append({"epoch": 2})
    writer.wait()
    saved = torch.load(tmp_path / "best.pt")
    assert torch.equal(saved["model"], torch.zeros(1000)) and saved["history"] == [{"epoch": 1}]


def test_a_failed_background_write_is_raised_by_the_next_wait(tmp_path, monkeypatch):
    writer = CheckpointWriter()
    real_save = torch.save

    def disk_full(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)
    monkeypatch.setattr(torch, "save", disk_full)
    writer.submit({"epoch": 1}, tmp_path / "last.pt")
    with pytest.raises(UserError, match="No space left on device; free space on that disk"):
        writer.wait()
    assert not any(tmp_path.iterdir())


def test_the_rename_is_made_durable_by_syncing_the_directory(tmp_path, monkeypatch):
    import os
    import stat
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    assert synced == [False, True]  # the file's data, then the folder holding the new name
