"""What a result records about the code: the git tree of the files as they are."""

from __future__ import annotations

import subprocess

from benchmarks.run_metadata import _working_tree_hash


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_tree_hash_names_the_commit_whose_files_these_are(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    committed = _git(repo, "rev-parse", "HEAD^{tree}")
    assert _working_tree_hash(repo) == committed
    (repo / ".device").mkdir()  # a folder a device call carries: not the project's files
    (repo / ".device" / "setup.sh").write_text("echo\n")
    assert _working_tree_hash(repo) == committed
    (repo / "a.py").write_text("x = 2\n")  # changed files: another tree
    changed = _working_tree_hash(repo)
    assert changed not in (None, committed)
    assert _git(repo, "status", "--porcelain")  # (the real index was not touched)
    assert _git(repo, "diff", "--cached") == ""
