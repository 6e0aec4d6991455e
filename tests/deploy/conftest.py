"""The deploy tests that need Beacon's image run last in the session, so its
(background) build overlaps other tests instead of delaying the first one (image.py)."""

from __future__ import annotations

import docker
import pytest

from tests.deploy.image import BUILD


def needs_image(item: pytest.Item) -> bool:
    return "beacon_image" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Stable: the other tests keep their order, the image tests keep theirs.
    items.sort(key=needs_image)


@pytest.fixture(scope="session")
def beacon_image(docker_client: docker.DockerClient) -> str:
    """The image, built by deploy/build-image.sh as a user would offline (or reused from Docker's cache)."""
    return BUILD.result()
