"""Provenance of results: the commit is read from the checkout's git files, and every record
names command, commit, date, device and versions."""

from __future__ import annotations

from visurf_engine.provenance import git_commit, provenance


def test_git_commit_reads_head(tmp_path):
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    assert git_commit(tmp_path) == "a" * 40
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs\n{'b' * 40} refs/heads/main\n")
    assert git_commit(tmp_path) == "b" * 40
    assert git_commit(tmp_path / "nowhere") is None


def test_provenance_names_what_produced_a_result():
    p = provenance(["python", "bench/x.py", "--quick"])
    assert p["command"] == "python bench/x.py --quick"
    assert {"commit", "date", "device", "machine", "versions", "threads"} <= set(p)
    assert {"python", "torch", "transformers"} <= set(p["versions"])
