"""The plug-in registries: modalities and tokenizer families, one line each.

A *modality* (text, image, video) owns its file detection, its read and decode
transforms, its reader options (part of the version id) and how its blocks
become rows. A *tokenizer family* (`tiktoken:`, `patch:`, ...) declares its
spec prefix, the modalities it serves, its options, its loader and its
optional dependency. Each lives in its own file as a module-level `MODALITY` or
`FAMILY` value; the tables below name those files, so adding one is one file
plus one line here. See docs/architecture.md, "Adding a tokenizer".

Plug-in files are imported when the registry is first asked about them (the
CLI's option table and --help ask about every one), so their top-level imports
must stay light: heavy libraries (torch, transformers) are imported inside the
loader.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from typing import Any, Callable, Iterable, Mapping

from tokenmill.transforms.tokenizers.base import TokenizerSpecError

# name -> "module:attribute" of its declaration.
MODALITIES = {
    "text": "tokenmill.transforms.modalities.text:MODALITY",
    "image": "tokenmill.transforms.modalities.image:MODALITY",
    "video": "tokenmill.transforms.modalities.video:MODALITY",
}
FAMILIES = {
    "tiktoken": "tokenmill.transforms.tokenizers.bpe:FAMILY",
    "bytes": "tokenmill.transforms.tokenizers.byte_level:FAMILY",
    "hf": "tokenmill.transforms.tokenizers.hf:FAMILY",
    "sentencepiece": "tokenmill.transforms.tokenizers.sentencepiece_model:FAMILY",
    "patch": "tokenmill.transforms.tokenizers.patches:FAMILY",
    "vq": "tokenmill.transforms.tokenizers.codebook:VQ_FAMILY",
    "pca": "tokenmill.transforms.tokenizers.codebook:PCA_FAMILY",
    # diffusers before torchscript: the first family to declare an option gives its CLI form (--dtype with fp16)
    "diffusers": "tokenmill.transforms.tokenizers.diffusers_vae:FAMILY",
    "torchscript": "tokenmill.transforms.tokenizers.torchscript:FAMILY",
    "export": "tokenmill.transforms.tokenizers.exported:FAMILY",
}



@dataclasses.dataclass(frozen=True)
class Option:
    """One build option: the CLI flag `--name-with-dashes`, the YAML and spec-JSON key `name`.

    `type` converts a command-line string (and is reused for YAML/JSON values
    that are not already of the right type); None makes a switch (a bool).
    """

    name: str
    help: str
    type: Callable[[str], Any] | None = str
    default: Any = None
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    repeat: bool = False  # may be given several times: a list
    # strict: a family that does not take it refuses it when set (--engine with bytes would mislead);
    # other options of other families are ignored, as a YAML file's `defaults` may set them for all sources.
    strict: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, where: str) -> Any:
        """A YAML or JSON value as this option's typed value; raises ValueError with a one-line reason."""
        if self.type is None:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {self.name} must be true or false, not {value!r}")
            return value
        if self.repeat:
            values = value if isinstance(value, list) else [value]
            return [self._one(v, where) for v in values]
        if isinstance(value, list):
            raise ValueError(f"{where}: {self.name} takes one value, not a list")
        return self._one(value, where)

    def _one(self, value: Any, where: str) -> Any:
        if value is None:
            if self.default is None and not self.repeat:  # "not set" is a value of this option
                return None
            raise ValueError(f"{where}: {self.name} needs a value, not null")
        if isinstance(value, (dict, list)) or isinstance(value, bool) and self.type is not str:
            raise ValueError(f"{where}: {self.name} must be a string or number, not {value!r}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        try:
            out = self.type(text)
        except Exception as e:  # argparse.ArgumentTypeError, ValueError
            raise ValueError(f"{where}: {self.name}: {e}") from None
        if self.choices is not None and out not in self.choices:
            raise ValueError(f"{where}: {self.name} must be one of {', '.join(map(str, self.choices))}, not {out!r}")
        return out


@dataclasses.dataclass(frozen=True)
class TokenizerFamily:
    """A family of tokenizers named by a spec prefix: `prefix:ARG` (or the bare prefix)."""

    prefix: str
    modalities: tuple[str, ...]
    usage: tuple[str, ...]  # how specs look, for --help: ("tiktoken:cl100k_base", "tiktoken:PATH_OR_URI")
    loader: str  # "module:function", called as function(spec, arg, modality, **options)
    options: tuple[Option, ...] = ()  # options this family takes (besides its modality's)
    extra: str | None = None  # pip extra that brings `requires`
    requires: tuple[str, ...] = ()  # importable modules the loader needs
    bare: bool = False  # the spec is the prefix alone (`bytes`)
    modality_of: Callable[[str], str | None] | None = None  # modality implied by the argument alone
    # Encoding costs little next to decoding (patch:), so decoding gets the worker's cores; families
    # that keep the cores busy themselves (BLAS, torch) get one decode thread (measured: vq slower).
    light: bool = False

    def check_dependencies(self) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            hint = f": pip install 'tokenmill[{self.extra}]'" if self.extra else ""
            raise TokenizerSpecError(f"{self.prefix}: tokenizers need {', '.join(missing)}, which is not "
                                     f"installed{hint}")

    def load(self, spec: str, modality: str, options: Mapping[str, Any]):
        family, _, arg = spec.partition(":")
        if self.bare and arg:
            raise TokenizerSpecError(f"{self.prefix} takes no argument: {self.prefix}, not {spec!r}")
        if not self.bare and not arg:
            raise TokenizerSpecError(f"{self.prefix} needs an argument: {' or '.join(self.usage)}")
        if modality not in self.modalities:
            raise TokenizerSpecError(f"{spec!r} is not a {modality} tokenizer ({self.prefix}: serves "
                                     f"{', '.join(self.modalities)})")
        own = {o.name: o for o in self.options}
        for name, value in options.items():
            if name not in own and value != _option_defaults().get(name, value):
                raise TokenizerSpecError(f"--{name.replace('_', '-')} does not apply to {spec!r} "
                                         f"(it applies to {', '.join(_takers(name))})")
        self.check_dependencies()
        return _resolve(self.loader)(spec, arg, modality, **{k: v for k, v in options.items() if k in own})


class Modality:
    """Base of the modality plug-ins (transforms/modalities/): see registry's docstring.

    Subclasses set `name`, `options` and the step labels, and implement the
    methods below; transforms/modalities/text.py is the smallest.
    """

    name: str
    options: tuple[Option, ...] = ()
    allocator_tuning = False  # whether local workers should keep freed memory (pipelines/local)

    def detect(self, uri: str) -> bool | None:
        """True: a file of this modality; None: could be (Parquet, tar); False: not."""
        raise NotImplementedError

    def record(self, reader: Mapping[str, Any]) -> dict[str, Any]:
        """The reader options that shape the rows, as recorded in the manifest (part of the version id)."""
        raise NotImplementedError

    def check(self, reader: Mapping[str, Any]) -> None:
        """Raise ValueError with a one-line reason for reader options that cannot work."""

    def read_and_decode(self, pbegin, spec, incremental, threads: int):
        """Apply the read and decode steps: (read outputs dict, decoded blocks, decode failures)."""
        raise NotImplementedError

    def tokenize(self, decoded, spec, cores: int):
        """Apply the tokenize step: (token blocks, tokenize failures)."""
        raise NotImplementedError

    # How its blocks become rows on the workers, and their Arrow schema: names of functions in
    # transforms/tokenize.py, (tokenizer, block, schema) -> TokenBlock and (tokenizer) -> pa.Schema.
    rows_function: str
    schema_function: str

    def rows_and_schema(self, tokenizer):
        from tokenmill.transforms import tokenize

        return getattr(tokenize, self.rows_function), getattr(tokenize, self.schema_function)(tokenizer)


_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_BYTES = 1 << 30  # keeps a block's token offsets within Arrow's 32-bit list offsets


def byte_size(text: str) -> int:
    """'8MiB', '512k', '1048576' → bytes (an Option type)."""
    import argparse

    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = _SIZE_SUFFIXES.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in _SIZE_SUFFIXES else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8MiB, 512k)") from None
    if not 0 < value <= MAX_BYTES:
        raise argparse.ArgumentTypeError(f"size must be between 1 byte and 1GiB: {text!r}")
    return value


def modality_of_files(uris: Iterable[str]) -> str | None:
    """The modality the file names say, where they agree and are unambiguous (Parquet and tar fit several)."""
    plugins = [modality(name) for name in MODALITIES]
    kinds = set()
    for uri in uris:
        sure = [m.name for m in plugins if m.detect(uri) is True]
        if len(sure) == 1:
            kinds.add(sure[0])
    return kinds.pop() if len(kinds) == 1 else None


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise TokenizerSpecError(f"unknown modality {name!r} (known: {', '.join(MODALITIES)})")
    return _resolve(MODALITIES[name])


def family_of(spec: str) -> TokenizerFamily:
    prefix = spec.partition(":")[0]
    if prefix not in FAMILIES:
        raise TokenizerSpecError(f"unknown tokenizer spec {spec!r}: expected one of {', '.join(usage())}")
    return _resolve(FAMILIES[prefix])


def families() -> Iterable[TokenizerFamily]:
    return (_resolve(target) for target in FAMILIES.values())


def usage(modality_name: str | None = None) -> list[str]:
    """Spec forms for --help, of every family or of those serving one modality."""
    return [u for f in families() if modality_name is None or modality_name in f.modalities for u in f.usage]


def modality_of_tokenizer(spec: str) -> str:
    """The modality a tokenizer spec implies on its own: its argument's (patch:T,P), else its family's first."""
    fam = family_of(spec)
    implied = fam.modality_of(spec.partition(":")[2]) if fam.modality_of else None
    return implied or fam.modalities[0]


def load_tokenizer(spec: str, modality_name: str, options: Mapping[str, Any] | None = None):
    """The tokenizer a spec names, for a modality; raises TokenizerSpecError with a one-line reason."""
    return family_of(spec).load(spec, modality_name, dict(options or {}))


@functools.lru_cache(maxsize=8)
def shared_tokenizer(spec: str, modality_name: str, options: tuple[tuple[str, Any], ...] = ()):
    """One tokenizer per process, spec, modality and options: the workers of one process (and the
    launcher, on a local runner) share it instead of each loading its own. Tokenizers are safe to
    call from several threads."""
    return load_tokenizer(spec, modality_name, dict(options))


@functools.lru_cache(maxsize=1)
def _option_defaults() -> dict[str, Any]:
    return {o.name: o.default for o in tokenizer_options()}


def _takers(name: str) -> list[str]:
    return [f.prefix + ("" if f.bare else ":") for f in families() if any(o.name == name for o in f.options)]


def tokenizer_options() -> list[Option]:
    """Every option some family declares, once each, in registry order."""
    seen: dict[str, Option] = {}
    for fam in families():
        for o in fam.options:
            seen.setdefault(o.name, o)
    return list(seen.values())
