"""Install the hybrid engine and the rlhf pipeline.

Nothing is compiled at install time: the C++/CUDA ops under csrc/ are JIT-compiled with ninja on first
use by hybrid_engine.ops.builder, so `pip install -e .` works on a machine with only Python and pip.
"""
from setuptools import find_packages, setup

setup(
    name="hybrid-engine-rlhf",
    version="0.1.0",
    description="A hybrid train/inference engine and an InstructGPT-style RLHF pipeline on DeepSpeed",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ ships inside the package as hybrid_engine/csrc, so a non-editable install can JIT-build its ops
    packages=find_packages(include=["hybrid_engine*", "rlhf*"]) + ["hybrid_engine.csrc"],
    package_dir={"hybrid_engine.csrc": "csrc"},
    package_data={"hybrid_engine.csrc": ["*.cuh", "*.h", "*.cpp", "*.sh", "*/*.cpp", "*/*.cu", "*/*.h", "*/*.cuh"]},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "deepspeed>=0.14",
        "transformers>=4.45",
        "peft>=0.12",
        "ninja",
        "tqdm",
        "matplotlib",
        "pyyaml",  # --config files
    ],
    # datasets: the dataset-dir format; gguf: tests/real_model.py converts SmolLM2 from its GGUF file;
    # tensorboard, wandb: --report-to, optional for users (large dependency trees few runs need), tested here;
    # trl: hybrid_engine.integrations.trl (optional for users; the adapter checks its range, 1.16.x, at import)
    extras_require={"test": ["pytest", "pytest-benchmark", "ruff", "datasets", "gguf", "tensorboard", "wandb",
                             "trl>=1.16,<1.17"]},
    entry_points={"console_scripts": ["rlhf=rlhf.cli:main"]},
)
