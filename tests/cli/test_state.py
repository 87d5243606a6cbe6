"""`clearway state recover` gets a refused state going again; `deploy` checks --env first."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from clearway.cli.main import cli
from clearway.control.store import Store
from clearway.spec import AppSpec, ServiceSpec

pytestmark = pytest.mark.timeout(30)


def test_recover_rebuilds_a_lost_database_and_says_what_it_did(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_revision(AppSpec(name="a", components=[ServiceSpec(name="web")]), code_dir=tmp_path, app_file="app.py", env={})
    store.close()
    (tmp_path / "state.db").unlink()
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "state", "recover", "--yes"])
    assert result.exit_code == 0, result.output
    assert "moved the damaged state to" in result.output and "committed changes were lost" in result.output
    Store(tmp_path / "state.db").close()


def test_deploy_refuses_a_bad_env_key_before_uploading(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "deploy", str(tmp_path), "--env", "BAD KEY=s3cret"])
    assert result.exit_code == 1
    assert "not a valid variable name" in result.output and "s3cret" not in result.output
