from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="distributex",
    version="1.0.0",
    description="A fair, event-driven network mutex and semaphore service",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.9",
    # twisted.plugins is listed by hand: it is a namespace package (no
    # __init__.py) that find_packages() cannot see. package_dir {"": "."}
    # makes `pip install -e .` add this directory to sys.path (a static .pth)
    # instead of an import hook, because Twisted finds plugins by scanning
    # sys.path for twisted/plugins directories: with a hook it sees nothing.
    package_dir={"": "."},
    packages=find_packages(include=["distributex", "distributex.*"]) + ["twisted.plugins"],
    package_data={"twisted.plugins": ["distributex_plugin.py"], "distributex": ["py.typed"]},
    include_package_data=True,
    install_requires=[
        "twisted>=22.10",
        "pyyaml>=5.1",
        "pymemcache>=4.0",
        "treq>=22.1",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "hypothesis>=6", "build", "wheel"],
    },
    entry_points={"console_scripts": ["distributex = distributex.client.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
