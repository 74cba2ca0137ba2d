import os
import stat

from jnnex.rundir import read_json, write_json


def test_atomic_files_get_the_usual_permissions_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644  # as open() would make it, not mkstemp's 0600
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
