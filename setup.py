"""Ships the checkout's runtime files in the wheel (and the sdist) as package data, read from
where the checkout keeps them, so that training, benches and tests keep their layout
(``checkpoints/<id>/``, ``docs/examples/``). Everything else is in ``pyproject.toml``.

A wheel install finds them through ``importlib.resources``: ``models.checkpoint.
default_checkpoint_dir`` and ``service.settings.examples_dir``. An editable install reads the
checkout's folders directly and gets no copy.
"""
import os
from glob import glob

from setuptools import setup
from setuptools.command.build_py import build_py

#: (package folder in the wheel, folder in the checkout, file patterns there): the embedded priors'
#: cards and weights (never ``resume.safetensors``: optimizer state stays out of the wheel and the
#: image) and the request examples shown on ``/docs``.
SHIPPED = [
    ("models/checkpoints", "checkpoints", ("*/card.json", "*/weights.safetensors")),
    ("service/examples", os.path.join("docs", "examples"), ("*-request.json",)),
    ("service/web", os.path.join("service", "web"), ("*.html", "*.css", "*.js")),  # the page at /
]


class BuildPy(build_py):
    """``build_py`` whose package data also holds :data:`SHIPPED` (``data_files`` tuples: the
    sdist lists them as sources, the wheel copies them)."""

    def _get_data_files(self):
        return super()._get_data_files() + self._shipped()

    def get_data_files_without_manifest(self):
        return super().get_data_files_without_manifest() + self._shipped()

    def _shipped(self):
        if self.editable_mode:
            return []
        out = []
        for target, source, patterns in SHIPPED:
            names = sorted(os.path.relpath(f, source) for p in patterns for f in glob(os.path.join(source, p)))
            package = target.replace("/", ".")
            out.append((package, source, os.path.join(self.build_lib, *target.split("/")), names))
        return out


setup(cmdclass={"build_py": BuildPy})
