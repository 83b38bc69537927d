"""The hypercorn and quart internals we rely on are still where we reach for them."""

from __future__ import annotations

import pytest

from trio_launcher import _hypercorn
from trio_launcher._hypercorn import CONTRACT, broken_contract


def test_every_internal_we_use_is_there() -> None:
    assert broken_contract() == []


@pytest.mark.parametrize(
    ("owner", "attribute", "named"),
    [
        (_hypercorn.TCPServer, "_initiate_server_close", "TCPServer._initiate_server_close"),
        (_hypercorn.Lifespan, "asgi_send", "Lifespan.handle_lifespan/asgi_send"),
        (_hypercorn.H2Protocol, "idle", "H2Protocol.idle"),
    ],
)
def test_a_moved_internal_is_named(
    monkeypatch: pytest.MonkeyPatch, owner: type, attribute: str, named: str
) -> None:
    monkeypatch.delattr(owner, attribute)
    broken = broken_contract()
    assert len(broken) == 1
    assert named in broken[0]


def test_changed_parameters_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    async def handle(app: object, config: object, scope: object) -> None: ...

    monkeypatch.setattr(_hypercorn, "_handle", handle)
    assert broken_contract() == ["hypercorn.trio.task_group._handle(...) parameters"]


def test_no_other_module_imports_hypercorn_internals() -> None:
    import pathlib

    package = pathlib.Path(_hypercorn.__file__).parent
    public = ("from hypercorn.config import Config",)
    for path in package.glob("*.py"):
        if path.name == "_hypercorn.py":
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("from hypercorn", "import hypercorn")):
                assert stripped in public, f"{path.name}: {stripped}"
            assert "error_handler_spec" not in stripped, path.name
    assert len(CONTRACT) >= 10


def test_importing_the_package_adds_no_log_filter() -> None:
    import logging
    import subprocess
    import sys

    code = (
        "import logging, trio_launcher, trio_launcher.testing;"
        "print(len(logging.getLogger('trio.serve_listeners').filters))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
    assert logging.getLogger("trio.serve_listeners").filters == []  # none left by other tests
