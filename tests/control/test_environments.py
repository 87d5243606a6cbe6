"""App environments: cache keys, digests, and real builds with uv (offline, local wheels)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from clearway.control.environments import (
    REPLICA_REQUIREMENTS,
    Dependencies,
    EnvironmentBuilder,
    check_servers,
    env_digest,
    input_digest,
    normalise_pins,
    read_dependencies,
)
from clearway.control.retention import kept
from clearway.control.store import Revision, RevisionState
from clearway.exceptions import APIError
from clearway.spec.model import AppSpec, ServiceSpec
from tests.wheels import demo_wheelhouse, make_wheel

pytestmark = pytest.mark.timeout(120)


# -- cache keys, no uv ----------------------------------------------------------
def test_the_input_digest_covers_the_files_the_interpreter_and_clearways_needs() -> None:
    one = Dependencies("requirements.txt", {"requirements.txt": b"cwdemo==1.0\n"})
    same = Dependencies("requirements.txt", {"requirements.txt": b"cwdemo==1.0\n"})
    other = Dependencies("requirements.txt", {"requirements.txt": b"cwdemo==2.0\n"})
    assert input_digest(one, "3.11.7") == input_digest(same, "3.11.7")
    assert input_digest(one, "3.11.7") != input_digest(other, "3.11.7")
    assert input_digest(one, "3.11.7") != input_digest(one, "3.12.1")
    assert input_digest(Dependencies("none"), "3.11.7") != input_digest(one, "3.11.7")


def test_the_environment_digest_is_the_resolved_set_whatever_its_spelling() -> None:
    uv_output = "# a comment\nPydantic==2.7.0\n\ntyping_extensions==4.12.0\n"
    reordered = "typing-extensions==4.12.0\npydantic==2.7.0\n"
    assert normalise_pins(uv_output) == ["pydantic==2.7.0", "typing-extensions==4.12.0"]
    assert env_digest(normalise_pins(uv_output), "3.11.7") == env_digest(normalise_pins(reordered), "3.11.7")
    assert env_digest(normalise_pins(reordered), "3.11.7") != env_digest(normalise_pins(reordered), "3.12.0")


def test_declarations_are_read_the_standard_ways(tmp_path: Path) -> None:
    assert read_dependencies(tmp_path).source == "none"
    (tmp_path / "requirements.txt").write_text("cwdemo==1.0\n")
    assert read_dependencies(tmp_path).source == "requirements.txt"
    # A pyproject.toml that declares nothing (a tool config) leaves requirements.txt in charge.
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 100\n")
    assert read_dependencies(tmp_path).source == "requirements.txt"
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "1"\nrequires-python = ">=3.11"\ndependencies = ["cwdemo>=1"]\n'
    )
    deps = read_dependencies(tmp_path)
    assert (deps.source, deps.requirements, deps.requires_python) == ("pyproject.toml", ("cwdemo>=1",), ">=3.11")
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert read_dependencies(tmp_path).source == "uv.lock"
    (tmp_path / "pyproject.toml").write_text("[project\n")
    with pytest.raises(APIError, match=r"pyproject\.toml cannot be read"):
        read_dependencies(tmp_path)


def test_retention_keeps_the_newest_and_every_running_revision() -> None:
    spec = AppSpec(name="a", components=[ServiceSpec(name="web")])

    def rev(number: int, state: RevisionState) -> Revision:
        return Revision(
            f"a-{number}", "a", number, spec, Path("/x"), "app.py", {}, state, None, 0.0, None, None
        )

    revisions = [rev(1, RevisionState.ACTIVE), *(rev(n, RevisionState.RETIRED) for n in range(2, 6))]
    assert kept(revisions, 2) == {"a-1", "a-4", "a-5"}


# -- real builds ------------------------------------------------------------------
@pytest.fixture
def builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EnvironmentBuilder:
    monkeypatch.setenv("UV_FIND_LINKS", str(demo_wheelhouse(tmp_path / "wheels")))
    home = tmp_path / "home"
    home.mkdir()
    return EnvironmentBuilder(home)


def project(root: Path, requirements: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if requirements is not None:
        (root / "requirements.txt").write_text(requirements)
    return root


def run_in(python: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with an environment's interpreter (called through a thread from async tests)."""
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60)


async def test_an_environment_holds_the_apps_pins_and_the_replica_runtime(
    tmp_path: Path, builder: EnvironmentBuilder
) -> None:
    built = await builder.ensure(project(tmp_path / "a", "cwdemo==1.0\n"))
    assert not built.reused and built.digest.startswith("sha256:")
    assert built.path == builder.root / built.digest.removeprefix("sha256:")
    assert (await asyncio.to_thread(run_in, built.python, "import cwdemo; print(cwdemo.__version__)")).stdout.strip() == "1.0"
    # What the replica runtime imports is there, and clearway itself, but not the control plane.
    check = "import clearway.runtime.replica, uvicorn, a2wsgi, importlib.util as u; print(u.find_spec('fastapi'))"
    out = await asyncio.to_thread(run_in, built.python, check)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
    assert list((builder.root / ".staging").iterdir()) == []


async def test_unchanged_inputs_reuse_and_equal_resolutions_share(tmp_path: Path, builder: EnvironmentBuilder) -> None:
    first = await builder.ensure(project(tmp_path / "a", "cwdemo==2.0\n"))
    again = await builder.ensure(project(tmp_path / "b", "cwdemo==2.0\n"))
    assert again.reused and again.digest == first.digest and "no resolver run" in again.log
    # Other words, same resolution: resolved again, but no second environment.
    spelled = await builder.ensure(project(tmp_path / "c", "cwdemo>=2,<3\n"))
    assert not spelled.reused and spelled.digest == first.digest
    assert builder.existing() == [first.digest]


async def test_concurrent_builds_of_one_set_build_it_once(tmp_path: Path, builder: EnvironmentBuilder) -> None:
    results = await asyncio.gather(
        *(builder.ensure(project(tmp_path / f"p{i}", f"cwdemo==1.0\n{'#' * i}\n")) for i in range(3))
    )
    assert len({r.digest for r in results}) == 1 and builder.existing() == [results[0].digest]


async def test_no_declared_dependencies_get_only_the_runtime(tmp_path: Path, builder: EnvironmentBuilder) -> None:
    built = await builder.ensure(project(tmp_path / "a", None))
    out = await asyncio.to_thread(run_in, built.python, "import cwdemo")
    assert out.returncode != 0 and "No module named 'cwdemo'" in out.stderr


async def test_an_unresolvable_pin_fails_with_uvs_message(tmp_path: Path, builder: EnvironmentBuilder) -> None:
    with pytest.raises(APIError) as caught:
        await builder.ensure(project(tmp_path / "a", "cwdemo==9.9\n"))
    assert caught.value.status == 422 and caught.value.message.startswith("fix the dependencies in requirements.txt")
    assert "cwdemo" in (caught.value.details or "") and "9.9" in (caught.value.details or "")
    assert builder.existing() == []


async def test_a_clash_with_the_replica_runtime_names_clearways_requirement(
    tmp_path: Path, builder: EnvironmentBuilder
) -> None:
    with pytest.raises(APIError) as caught:
        await builder.ensure(project(tmp_path / "a", "uvicorn==0.1.0\n"))
    assert caught.value.status == 422 and "clearway's replica runtime" in caught.value.message
    details = caught.value.details or ""
    assert "uvicorn" in details and "REPLICA_REQUIREMENTS" in details
    assert all(r in details for r in REPLICA_REQUIREMENTS)


async def test_granian_is_in_every_environment_its_pins_allow_and_serves_under_auto(
    tmp_path: Path, builder: EnvironmentBuilder
) -> None:
    built = await builder.ensure(project(tmp_path / "a", "cwdemo==1.0\n"))
    assert built.granian and "granian" not in built.log
    check = "from clearway.runtime.servers import choose; print(choose('auto', kind='service', interface='wsgi'))"
    assert (await asyncio.to_thread(run_in, built.python, check)).stdout.strip() == "granian"


async def test_pins_that_exclude_granian_fall_back_to_uvicorn_and_say_so(
    tmp_path: Path, builder: EnvironmentBuilder
) -> None:
    # An app pinning an old granian of its own: resolvable, but not beside granian>=2.8.
    make_wheel(tmp_path / "wheels", "granian", "1.0")
    built = await builder.ensure(project(tmp_path / "a", "granian==1.0\n"))
    assert not built.granian
    line = built.log.splitlines()[-1]
    assert line.startswith("granian is not in this environment: the app's dependencies exclude granian>=2.8,<2.9")
    assert line.endswith("WSGI services with server='auto' run on uvicorn (through a2wsgi)")
    assert "granian" in built.without_granian  # uv's own explanation, kept for the error below
    check = "from clearway.runtime.servers import choose; print(choose('auto', kind='service', interface='wsgi'))"
    assert (await asyncio.to_thread(run_in, built.python, check)).stdout.strip() == "uvicorn"
    # Reused: the same line, from the environment's manifest.
    again = await builder.ensure(project(tmp_path / "b", "granian==1.0\n"))
    assert again.reused and not again.granian and again.log.splitlines()[-1] == line

    auto = AppSpec(name="a", components=[ServiceSpec(name="web")])
    check_servers(auto, built)  # falls back: fine
    asking = AppSpec(name="a", components=[ServiceSpec(name="web", server="granian")])
    with pytest.raises(APIError) as caught:
        check_servers(asking, built)
    assert caught.value.status == 422
    assert caught.value.message.startswith("'web' asks for server='granian', but granian cannot be installed")
    assert "server='auto'" in caught.value.message and "granian" in (caught.value.details or "")


async def test_a_requires_python_nothing_satisfies_fails_naming_it(tmp_path: Path, builder: EnvironmentBuilder) -> None:
    root = project(tmp_path / "a", None)
    (root / "pyproject.toml").write_text('[project]\nname = "a"\nversion = "1"\nrequires-python = ">=3.99"\n')
    with pytest.raises(APIError) as caught:
        await builder.ensure(root)
    assert caught.value.status == 422 and "'>=3.99'" in caught.value.message
    assert "interpreters found" in (caught.value.details or "")
    assert builder.existing() == []


def test_artifact_references_resolve_to_this_machines_paths(tmp_path: Path) -> None:
    from clearway.backends.base import Artifact
    from clearway.backends.local.artifacts import ArtifactStore

    store = ArtifactStore(tmp_path, platform_python="/usr/bin/python3")
    current = Artifact(code="ab" * 32, env="sha256:" + "cd" * 32, python="3.11.7")
    assert store.code_dir("hello", current) == tmp_path / "code" / "hello" / ("ab" * 32)
    assert store.python(current) == str(tmp_path / "envs" / ("cd" * 32) / "bin" / "python")
    # Revisions from before per-app environments run as they always did.
    assert store.python(Artifact(code="ab" * 32, env=None, python="3.11.7")) == "/usr/bin/python3"


def test_uv_gets_the_machines_tls_and_proxy_settings_and_no_other_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host with a private CA (or a TLS-inspecting proxy) reaches no index without these.
    monkeypatch.setenv("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("UV_INDEX_URL", "https://index.internal/simple")
    monkeypatch.setenv("CLEARWAY_TEST_SECRET", "do-not-pass")
    env = EnvironmentBuilder(tmp_path).uv_env()
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    assert env["UV_INDEX_URL"] == "https://index.internal/simple"
    assert env["UV_PYTHON_DOWNLOADS"] == "never"
    assert "CLEARWAY_TEST_SECRET" not in env
