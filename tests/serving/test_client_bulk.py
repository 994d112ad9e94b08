"""slora-client's directory load and load progress, against a stand-in client (no server)."""

from __future__ import annotations

import io
import json
import time

import pytest
from slora_client import cli
from slora_client.bulk import adapter_dirs, load_directory, with_progress
from slora_client.errors import SLoRAClientError


def _root(tmp_path):
    for name in ("b-adapter", "a-adapter", "broken"):
        (tmp_path / "team" / name).mkdir(parents=True)
        (tmp_path / "team" / name / "adapter_config.json").write_text("{}")
    (tmp_path / "team" / "notes").mkdir()  # no adapter_config.json: not an adapter
    return tmp_path


class FakeClient:
    def __init__(self, *args, **kwargs):
        self.calls = []

    def load_adapter(self, name, path=None):
        self.calls.append((name, path))
        if name == "broken":
            raise SLoRAClientError("INVALID_ARG", "adapter 'broken': adapter_model.safetensors is missing")
        return {"name": name, "rank": 8}

    def close(self):
        pass


def test_adapter_dirs_lists_only_adapter_directories_sorted(tmp_path):
    root = _root(tmp_path)
    assert adapter_dirs(root, "team") == ["a-adapter", "b-adapter", "broken"]
    with pytest.raises(SLoRAClientError, match="is not a directory"):
        adapter_dirs(root, "missing")


def test_load_directory_reports_each_adapter_and_goes_on_after_a_failure(tmp_path):
    root, fake, out = _root(tmp_path), FakeClient(), io.StringIO()
    results = load_directory(fake.load_adapter, root, "team", out)
    assert fake.calls == [("a-adapter", "team/a-adapter"), ("b-adapter", "team/b-adapter"),
                          ("broken", "team/broken")]
    assert [r["ok"] for r in results] == [True, True, False]
    assert results[2]["error"] == {"code": "INVALID_ARG",
                                   "message": "adapter 'broken': adapter_model.safetensors is missing"}
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3] a-adapter: loaded (rank 8) in ")
    assert lines[2].startswith("[3/3] broken: failed (INVALID_ARG): adapter 'broken'")


def test_cli_load_dir_exit_status_and_json(tmp_path, monkeypatch, capsys):
    root = _root(tmp_path)
    monkeypatch.setattr(cli, "SLoRAClient", FakeClient)
    assert cli.main(["--json", "adapters", "load-dir", "team", "--adapter-root", str(root)]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["ok"]) for r in results] == [("a-adapter", True), ("b-adapter", True),
                                                        ("broken", False)]
    (root / "team" / "broken" / "adapter_config.json").unlink()
    assert cli.main(["adapters", "load-dir", "team", "--adapter-root", str(root)]) == 0


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_ticks_on_a_terminal_only():
    tty = _Terminal()
    assert with_progress("loading x", lambda: time.sleep(0.35) or 7, tty, interval_s=0.1) == 7
    assert "\rloading x  0s" in tty.getvalue()
    plain = io.StringIO()
    assert with_progress("loading x", lambda: 7, plain, interval_s=0.1) == 7
    assert plain.getvalue() == ""
