"""Suite-wide settings: quiet logs (tests assert events with structlog.testing.capture_logs)."""

from __future__ import annotations

import os

from savevm.logging import configure_logging

configure_logging("console", os.environ.get("SAVEVM_TEST_LOG_LEVEL", "warning"))
