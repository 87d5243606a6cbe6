"""The SDK records intent, validates early and points errors at the user's line."""

import subprocess
import sys
from pathlib import Path

import pytest

import clearway as cw
from clearway.exceptions import AppLoadError, SpecError
from clearway.sdk.inspect import inspect_app
from clearway.sdk.loader import load_app, resolve_app_file


def test_decorators_return_the_function_unchanged_and_record_the_spec() -> None:
    app = cw.App("hello")

    def web() -> object:
        return object()

    decorated = app.service(replicas=3, public=True, health="/healthz")(web)
    assert decorated is web
    spec = app.spec()
    service = spec.component("web")
    assert isinstance(service, cw.ServiceSpec)
    assert (service.replicas, service.public, service.health) == (3, True, "/healthz")
    assert service.source is not None and service.source.file == __file__


def test_underscores_in_function_names_become_dashes() -> None:
    app = cw.App("hello")

    @app.worker()
    def clean_up() -> None: ...

    assert list(app.components) == ["clean-up"]


def test_bad_argument_points_at_the_decorator_line() -> None:
    app = cw.App("hello")
    with pytest.raises(SpecError) as info:
        @app.service(replicas=-2)  # the line the error must name
        def web() -> None: ...
    line = info.value.location
    assert line is not None and line.endswith(f"test_sdk.py:{web_line()}")
    assert "replicas" in info.value.message


def web_line() -> int:
    source = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(source, 1) if "the line the error must name" in text)


def test_duplicate_component_names_are_refused_with_both_locations() -> None:
    app = cw.App("hello")

    @app.service()
    def web() -> None: ...

    with pytest.raises(SpecError, match=r"already declared at .*test_sdk\.py"):
        app.worker(name="web")(lambda: None)


def test_bad_app_name_is_refused_at_its_line() -> None:
    with pytest.raises(SpecError, match="not a valid name") as info:
        cw.App("Hello World")
    assert info.value.location is not None and "test_sdk.py" in info.value.location


def test_loader_reports_missing_file_and_import_errors(tmp_path: Path) -> None:
    with pytest.raises(AppLoadError, match="no app file"):
        resolve_app_file(tmp_path)
    (tmp_path / "app.py").write_text("import clearway as cw\napp = cw.App('x')\nraise RuntimeError('boom at import')\n")
    with pytest.raises(AppLoadError) as info:
        load_app(tmp_path / "app.py")
    assert "RuntimeError: boom at import" in info.value.message
    assert info.value.details is not None and 'app.py", line 3' in info.value.details


def test_loader_requires_exactly_one_app(tmp_path: Path) -> None:
    (tmp_path / "none.py").write_text("x = 1\n")
    with pytest.raises(AppLoadError, match="defines no clearway app"):
        load_app(tmp_path / "none.py")
    (tmp_path / "two.py").write_text("import clearway as cw\na = cw.App('a')\nb = cw.App('b')\n")
    with pytest.raises(AppLoadError, match="defines 2 apps"):
        load_app(tmp_path / "two.py")


def test_inspect_runs_in_a_child_and_reports_relative_locations(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(
        "import clearway as cw\napp = cw.App('x')\n\n@app.service(path='nope')\ndef web(): ...\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "clearway.sdk.inspect", str(tmp_path / "app.py")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert '"ok": false' in last and '"location": "app.py:4"' in last


def test_inspect_produces_the_spec(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(
        "import clearway as cw\nprint('noise on stdout')\napp = cw.App('x')\n\n@app.worker(replicas=2)\ndef jobs(): ...\n"
    )
    result = inspect_app(tmp_path / "app.py")
    assert result["ok"] is True
    assert result["spec"]["components"][0] == result["spec"]["components"][0] | {
        "kind": "worker", "name": "jobs", "replicas": 2, "source": {"file": "app.py", "line": 5}
    }
