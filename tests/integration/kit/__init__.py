"""Helpers the integration tests share: `kit.Worker`, `kit.produce`, `kit.wait_for_outputs`, `kit.by_device`...
Fixtures stay in conftest.py; everything else a test calls lives here, one module a role."""

from tests.integration.kit.compare import *  # noqa: F403
from tests.integration.kit.process import *  # noqa: F403
from tests.integration.kit.records import *  # noqa: F403
from tests.integration.kit.releases import *  # noqa: F403
