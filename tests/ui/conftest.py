"""The UI tests are the last ones before the deploy tests that need Beacon's
image: start its build now, in the background, if the session has such a test
(tests/deploy/image.py says why)."""

from __future__ import annotations

import pytest

from tests.deploy.image import BUILD


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.session.config.stash.get(_NEEDS_IMAGE, False):
        BUILD.start()


_NEEDS_IMAGE = pytest.StashKey[bool]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    config.stash[_NEEDS_IMAGE] = any("beacon_image" in getattr(i, "fixturenames", ()) for i in items)
