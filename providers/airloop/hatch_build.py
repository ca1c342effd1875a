"""Wheel build hook: the UI plugin's React app is built from its source (``plugins/ui/app``) when its
bundle is missing, so a wheel never ships without it. Editable installs read the bundle in place."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

APP = Path("src/airloop/plugins/ui/app")
BUNDLE = Path("src/airloop/plugins/ui/static/airloop.js")


class AppBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable" or (Path(self.root) / BUNDLE).is_file():
            return
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"npm is needed to build the Airloop UI app ({BUNDLE} is missing): install Node.js 20.19+"
            )
        app = Path(self.root) / APP
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=app, check=True)
        subprocess.run([npm, "run", "build"], cwd=app, check=True)
