"""In-process agent fixtures: the real bundle loaded once, a fresh AgentService per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.backends.base import Backend
from agent.config import AgentConfig, JobsConfig, MqttConfig
from agent.runtime import LoadedModel, load_model
from agent.service import AgentService
from tests.conftest import Broker, unique_device


@pytest.fixture(scope="session")
def loaded_model(default_bundle: Path) -> LoadedModel:
    return load_model(default_bundle)


ServiceFactory = Callable[..., Any]


@pytest.fixture
def agent_service(
    loaded_model: LoadedModel, broker: Broker, tmp_path: Path
) -> Iterator[ServiceFactory]:
    """Start an AgentService on the real model and broker; stopped at the end of the test."""
    started: list[AgentService] = []

    def start(
        backend: Backend[Any] | None = None,
        reply_topics: tuple[str, ...] = ("#",),
        **jobs: Any,
    ) -> AgentService:
        config = AgentConfig(
            device_id=unique_device(),
            state_dir=tmp_path / "state",
            mqtt=MqttConfig(host=broker.host, port=broker.port, reply_topics=reply_topics),
            jobs=JobsConfig(**jobs),
        )
        model = replace(loaded_model, backend=backend) if backend else loaded_model
        service = AgentService(config, model)
        service.start()
        assert service.link.wait_connected(10), "the agent could not connect to the test broker"
        started.append(service)
        return service

    yield start
    for service in started:
        service.shutdown(grace_s=30)
