"""Build script: the package list is derived from the tree, so no subpackage can be left out of a wheel.

The product's top-level folders (``ROOTS``) install as ``mmspec`` and three of its subpackages, so nothing
generic such as ``kernels`` or ``vision`` lands in site-packages; every folder below them holding an
``__init__.py`` is a package. Everything else (metadata, dependencies, package data) is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

#: top-level folder -> the import name it installs as
ROOTS = {"mmspec": "mmspec", "vision": "mmspec.vision", "image_gen": "mmspec.image_gen", "kernels": "mmspec.kernels"}


def packages() -> list[str]:
    """Every package under ``ROOTS``, by import name."""
    found = []
    for folder, name in ROOTS.items():
        found += [name] + [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(found)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests read ROOTS with runpy
    setup(packages=packages(), package_dir={name: folder for folder, name in ROOTS.items()})
