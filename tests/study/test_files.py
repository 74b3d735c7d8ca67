"""study/files.py: outputs appear whole or not at all, with the umask's permissions; a killed run's temporaries are
cleaned up by the next write; JSON is strict."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from study.files import atomic_output_dir, remove_leftovers, write_json
from helpers import ROOT


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_temporaries_are_removed_by_the_next_write(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale_dir = tmp_path / f".samples.tmp-{dead}-abc"
    stale_dir.mkdir()
    (stale_dir / "half.safetensors").write_bytes(b"half")
    stale_old = tmp_path / f".samples.old-{dead}"
    stale_old.mkdir()
    busy = tmp_path / f".samples.tmp-{alive}-xyz"  # a run still going: left alone
    busy.mkdir()
    other = tmp_path / f".teacher.tmp-{dead}-abc"  # another output's: left to that output's next write
    other.mkdir()
    with atomic_output_dir(tmp_path / "samples") as tmp:
        (tmp / "samples.safetensors").write_bytes(b"whole")
    assert not stale_dir.exists() and not stale_old.exists()
    assert busy.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([busy.name, other.name, "samples"])
    assert remove_leftovers(tmp_path, "teacher") == [other]


def test_a_failed_write_leaves_the_previous_output(tmp_path):
    write_json(tmp_path / "out" / "m.json", {"a": 1})
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "m.json").write_text("{}")
        raise RuntimeError("crash")
    assert (tmp_path / "out" / "m.json").read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("umask, dirs, files", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664), (0o077, 0o700, 0o600)])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, umask, dirs, files):
    """Temporary files and directories are private (0600/0700); the outputs they become are not."""
    script = textwrap.dedent(f"""
        import os, sys
        os.umask({umask})
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from study.files import atomic_output_dir, write_json
        with atomic_output_dir(Path({str(tmp_path / 'out')!r})) as tmp:
            write_json(tmp / "m.json", {{"a": 1}})
        write_json(Path({str(tmp_path / 'metrics.json')!r}), {{"b": 2}})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(tmp_path / "out") == dirs
    assert mode(tmp_path / "out" / "m.json") == files and mode(tmp_path / "metrics.json") == files
