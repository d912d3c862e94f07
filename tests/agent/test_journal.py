"""The job journal on real SQLite files: round trip, restart, retention, a damaged file, a full
disk (a 256 KiB tmpfs: WAL mode needs its 32 KiB -shm beside the file)."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.journal import JOURNAL_FILE, JobJournal, JournalError
from tests.conftest import mounted_tmpfs

DONE = {
    "id": "j1",
    "event": "done",
    "text": "Paris.",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 12, "completion_tokens": 3},
}


def accept(journal: JobJournal, job_id: str, at: float | None = None, size: int = 40) -> None:
    payload = b'{"id": "%s", "prompt": "%s"}' % (job_id.encode(), b"x" * size)
    journal.record_accepted(
        job_id,
        payload,
        f"edgellm/d/results/{job_id}",
        b"corr-" + job_id.encode(),
        at or time.time(),
    )


def test_round_trip(tmp_path: Path) -> None:
    with JobJournal.in_state_dir(tmp_path) as journal:
        assert journal.recovered is None
        accept(journal, "j1")
        assert journal.stored_answer("j1") is None
        journal.record_started("j1")
        journal.record_done("j1", DONE)
        assert journal.stored_answer("j1") == DONE
        assert journal.unfinished() == []
        accept(journal, "j2")
        error = {"id": "j2", "event": "error", "error": {"code": "engine_error", "message": "x"}}
        journal.record_failed("j2", error)
        assert journal.stored_answer("j2") == error
        assert journal.stored_answer("unknown") is None
    db = sqlite3.connect(tmp_path / JOURNAL_FILE)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_restart_gives_unfinished_jobs_in_arrival_order(tmp_path: Path) -> None:
    journal = JobJournal.in_state_dir(tmp_path)
    accept(journal, "late", at=1000.0)
    accept(journal, "early", at=900.0)
    accept(journal, "answered", at=950.0)
    journal.record_started("late")
    journal.record_started("answered")
    journal.record_done("answered", {"id": "answered", "event": "done"})
    journal.close()  # as if the agent died here

    reopened = JobJournal.in_state_dir(tmp_path)
    jobs = reopened.unfinished()
    assert [j.job_id for j in jobs] == ["early", "late"]
    early, late = jobs
    assert early.state == "accepted" and early.attempts == 0
    assert late.state == "started" and late.attempts == 1
    assert late.request_payload.startswith(b'{"id": "late"')
    assert late.reply_topic == "edgellm/d/results/late"
    assert late.correlation_data == b"corr-late"
    assert late.received_at == 1000.0
    assert reopened.stored_answer("answered") == {"id": "answered", "event": "done"}
    reopened.record_started("late")  # re-run after the restart
    assert reopened.unfinished()[1].attempts == 2
    reopened.forget("early")
    assert [j.job_id for j in reopened.unfinished()] == ["late"]
    reopened.close()


def test_retention_purge(tmp_path: Path) -> None:
    journal = JobJournal.in_state_dir(tmp_path, retention_s=100.0)
    accept(journal, "old")
    journal.record_done("old", {"id": "old", "event": "done"})
    accept(journal, "waiting")
    now = time.time()
    assert journal.purge_expired(now) == 0
    assert journal.stored_answer("old") is not None
    assert journal.purge_expired(now + 101) == 1
    assert journal.stored_answer("old") is None
    assert [j.job_id for j in journal.unfinished()] == ["waiting"]  # never purged unanswered
    journal.close()


def test_answer_expires_even_before_purge(tmp_path: Path) -> None:
    journal = JobJournal.in_state_dir(tmp_path, retention_s=0.0)
    journal.record_done("j", {"id": "j", "event": "done"})  # answered without being journaled
    time.sleep(0.01)
    assert journal.stored_answer("j") is None
    journal.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda path: path.write_bytes(os.urandom(8192)), id="garbage"),
        pytest.param(lambda path: _truncate_pages(path), id="malformed"),
    ],
)
def test_a_damaged_file_is_moved_aside(tmp_path: Path, damage: object) -> None:
    journal = JobJournal.in_state_dir(tmp_path)
    for n in range(50):
        accept(journal, f"j{n}", size=400)
    journal.close()
    path = tmp_path / JOURNAL_FILE
    assert callable(damage)
    damage(path)

    recovered = JobJournal.in_state_dir(tmp_path)
    assert recovered.recovered is not None
    moved = recovered.recovered.moved_to
    assert moved.exists() and moved.name.startswith(f"{JOURNAL_FILE}.corrupt-")
    error = recovered.recovered.as_error()
    assert isinstance(error, AgentError) and error.code == "journal_error"
    assert str(moved) in error.message
    assert recovered.unfinished() == []  # a new journal, working
    accept(recovered, "after")
    assert [j.job_id for j in recovered.unfinished()] == ["after"]
    recovered.close()


def _truncate_pages(path: Path) -> None:
    """Damage the middle of the file, keeping a valid header: SQLite sees a malformed image."""
    data = bytearray(path.read_bytes())
    assert len(data) > 8192, "the test needs a journal of several pages"
    data[4096 : len(data) - 1024] = os.urandom(len(data) - 1024 - 4096)
    path.write_bytes(bytes(data))


def test_damage_found_while_running_is_a_journal_error(tmp_path: Path) -> None:
    journal = JobJournal.in_state_dir(tmp_path)
    for n in range(30):
        accept(journal, f"a{n}", size=400)
    path = tmp_path / JOURNAL_FILE
    checkpoint = sqlite3.connect(path, isolation_level=None)
    checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the main file
    checkpoint.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:  # the disk damages every page but the header
        f.seek(4096)
        f.write(os.urandom(size - 4096))
    # Another writer touches only the header page, so the agent's connection drops its cache and
    # has to read the damaged pages from the file.
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA user_version=1")
    other.close()
    for operation in (lambda: accept(journal, "b"), journal.unfinished):
        with pytest.raises(JournalError) as caught:
            operation()
        assert caught.value.code == "journal_error"
        assert "damaged" in caught.value.message and "restart the agent" in caught.value.message
    journal.close()
    reopened = JobJournal.in_state_dir(tmp_path)  # the restart the message asks for
    assert reopened.recovered is not None
    accept(reopened, "c")
    reopened.close()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tiny", "256k") as mount_point:
        yield mount_point


def test_full_disk_is_a_journal_error_and_earlier_records_survive(tiny_fs: Path) -> None:
    journal = JobJournal.in_state_dir(tiny_fs)
    accept(journal, "kept")
    journal.record_started("kept")
    journal.record_done("kept", DONE)
    accept(journal, "pending")
    # Fill what is left of the file system.
    fd = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 512):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(JournalError) as caught:
        for n in range(20):  # the WAL may still have a little room: keep writing until it is full
            accept(journal, f"big{n}", size=16 * 1024)
    assert caught.value.code == "journal_error"
    assert "full" in caught.value.message and str(tiny_fs) in caught.value.message
    assert journal.stored_answer("kept") == DONE
    assert [j.job_id for j in journal.unfinished()][:1] == ["pending"]
    journal.close()
    (tiny_fs / "filler").unlink()
    reopened = JobJournal.in_state_dir(tiny_fs)
    assert reopened.stored_answer("kept") == DONE
    assert "pending" in [j.job_id for j in reopened.unfinished()]
    reopened.close()


def test_unwritable_state_dir_is_a_journal_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("a file where the state dir should be")
        with pytest.raises(JournalError, match="cannot create the state dir"):
            JobJournal(blocker / JOURNAL_FILE)
        return
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(JournalError) as caught:
            JobJournal(tmp_path / JOURNAL_FILE)
        assert caught.value.code == "journal_error"
    finally:
        tmp_path.chmod(0o700)
