"""The one build step pyproject.toml cannot say: the wheel carries the shipped demo models.

`models/demo-*` (17 MB, fp16 safetensors and tokenizers) are copied into the built package as
`mamba_deploy/demo_models/`, so `mamba-deploy demo` runs offline from a pip-installed wheel as
it does from a checkout (demo.find_models looks there last). Everything else is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"


class BuildPyWithModels(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "mamba_deploy" / "demo_models"
        for folder in sorted(MODELS.glob("demo-*")):
            shutil.copytree(folder, dest / folder.name, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithModels})
