"""Result files name the code that produced them: the commit, marked dirty when the tracked files differ."""
import subprocess

import pytest

from ep_runtime.provenance import commit


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("EP_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "kernel.cu").write_text("int a;\n")
    _git(tmp_path, "add", "kernel.cu")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
    return tmp_path


def test_commit_of_a_clean_tree_is_its_head(repo):
    assert commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_commit_of_a_changed_tree_is_marked_dirty(repo):
    (repo / "kernel.cu").write_text("int b;\n")
    assert commit(repo) == _git(repo, "rev-parse", "HEAD") + "-dirty"


def test_untracked_files_do_not_make_a_tree_dirty(repo):
    (repo / "results.json").write_text("{}\n")
    assert commit(repo) == _git(repo, "rev-parse", "HEAD")


def test_ep_commit_overrides_git(repo, monkeypatch):
    monkeypatch.setenv("EP_COMMIT", "abc1234")
    (repo / "kernel.cu").write_text("int b;\n")
    assert commit(repo) == "abc1234"


def test_commit_outside_a_repository_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("EP_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert commit(tmp_path) == "unknown"


def test_a_copy_tracked_inside_another_repository_takes_its_commit(repo):
    vendored = repo / "third_party" / "ep"
    vendored.mkdir(parents=True)
    (vendored / "setup.py").write_text("")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "vendor")
    assert commit(vendored) == _git(repo, "rev-parse", "HEAD")


def test_a_package_installed_inside_another_work_tree_does_not_take_its_commit(repo):
    site_packages = repo / "venv" / "site-packages"  # where a non-editable install would put this package
    site_packages.mkdir(parents=True)
    assert commit(site_packages) == "unknown"
