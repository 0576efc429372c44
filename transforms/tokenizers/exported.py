"""`export:PATH_OR_URI`: a torch.export program (`.pt2`, torch.export.save) as an image or video encoder
(extra: tokenmill[torch]).

Same interface and options as `torchscript:` (transforms/tokenizers/neural.py):
the Cosmos image and video signatures, or one tensor (integer → hard codes,
floating → soft latents). A discrete program declares its vocabulary with a
scalar buffer or constant named `vocab_size` (or `codebook_size`), or an extra
file `vocab_size` (torch.export.save(..., extra_files={"vocab_size": "64000"}));
otherwise --vocab-size.

Shapes. A program accepts the shapes it was exported for: with torch.export.Dim
dynamic shapes (batch, H, W, and T for video) any size in their ranges; without
them, only the example's. The model is probed with its own example input (batch
1, or the program's fixed batch), and an item whose padded shape the program
refuses becomes an error row naming the shape (the rest of the build goes on).
A program exported with a fixed batch is called with that many items at most.

Dtype. An exported program is traced for one input dtype and refuses others:
--dtype must name the dtype it was exported in (export after .to(torch.bfloat16)
for bf16); a mismatch is a usage error.

Safety. torch.export.load is not safe on untrusted files (checked in torch
2.13's torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py):
  - weights and constants that are tensor subclasses are unpickled with
    torch.load(weights_only=False); opaque constants with pickle.loads; custom
    (torchbind) objects with the TorchScript unpickler; legacy `.pt` weight files
    and the 2.7 zip format through a loader that falls back to weights_only=False;
  - the example inputs are a torch.save pickle, loaded weights_only=True but
    retried with weights_only=False when that fails;
  - symbolic shape expressions (`expr_str`) go through sympy.sympify, which
    evaluates Python: a crafted expression runs code while the file loads, no
    pickle needed (tests/test_exported.py shows it);
  - an AOTInductor package in the archive is a shared library, loaded and run;
  - node targets are looked up by attribute path under torch, math or operator
    (torch's verifier refuses non-operator callables after loading).
So `load_program` reads the archive as a zip first and refuses, in one line,
anything that would need pickle, an AOTInductor library, a legacy layout, a
target outside torch.ops/operator/math, or an expression that is more than
sympy constructors, integers and symbol names; it loads the example inputs
itself with weights_only=True (so torch's own attempt succeeds and never falls
back). Only then does it call torch.export.load. After loading, every call in
the graph must be a torch operator.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile
from typing import Any

from tokenmill.transforms.tokenizers.base import TokenizerSpecError
from tokenmill.transforms.tokenizers.neural import (EncoderModel, NeuralImageTokenizer, NeuralVideoTokenizer,
                                                    latent_dtype_of, load_family, neural_options)

_VOCAB_NAMES = ("vocab_size", "codebook_size")
# What torch writes in `expr_str` (sympy.srepr of shape expressions): constructors, their keyword flags, literals.
_SYMPY_NAMES = frozenset("""
    Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge StrictLessThan StrictGreaterThan
    LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair floor ceiling true false True False
    oo zoo nan Infinity NegativeInfinity Half One Zero NegativeOne BooleanTrue BooleanFalse
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural
    FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt
    RoundDecimal ToFloat Identity BitwiseFn_bitwise_and BitwiseFn_bitwise_or OpaqueUnaryFn_sqrt
""".split())
_SYMPY_FLAGS = frozenset("""positive negative nonnegative nonpositive integer real finite infinite zero nonzero
    even odd prime commutative precision""".split())
_LITERAL = re.compile(r"[A-Za-z0-9_.+\-]*")
_OPERATOR_TARGET = re.compile(r"torch\.ops\.\w+\.\w+(\.\w+)?|_operator\.\w+|math\.\w+|torch\.(sym_\w+|_sym_sqrt)")
_PICKLED_PREFIXES = ("custom_obj", "opaque_obj")


def _safe_expression(text: str) -> bool:
    """True where a shape expression is only sympy constructors of integers, numbers and symbol names."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in _SYMPY_NAMES:
                return False
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str) and not _LITERAL.fullmatch(node.value):
                return False
            if not isinstance(node.value, (int, float, str, bool)):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg not in _SYMPY_FLAGS:
                return False
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                return False
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)):
                return False
        elif not isinstance(node, (ast.Expression, ast.UnaryOp, ast.USub, ast.UAdd, ast.Not, ast.Load,
                                   ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow,
                                   ast.Compare, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
                                   ast.BoolOp, ast.And, ast.Or)):
            return False
    return True


def _check_program_json(value: Any, where: str) -> None:
    """Every node target and operator argument a torch operator; every shape expression plain sympy."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                if k in ("target", "as_operator") and isinstance(item, str):
                    if not _OPERATOR_TARGET.fullmatch(item) or "__" in item:
                        raise TokenizerSpecError(f"{where} calls {item!r}, which is not a torch operator: refused")
                elif k == "expr_str" and isinstance(item, str):
                    if not _safe_expression(item):
                        raise TokenizerSpecError(f"{where} holds a shape expression that is not plain sympy "
                                                 f"({item[:60]!r}): refused")
                else:
                    stack.append(item)
        elif isinstance(v, list):
            stack.extend(v)


def _check_archive(data: bytes, uri: str) -> None:
    """Refuse, in one line, a .pt2 that torch.export.load would unpickle or run code from (module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile:
        raise TokenizerSpecError(f"cannot load exported program {uri}: not a .pt2 archive (torch.export.save "
                                 "writes one)") from None
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise TokenizerSpecError(f"cannot load exported program {uri}: not a .pt2 archive (torch.export.save "
                                 "writes one)")
    files = {n.split("/", 1)[1]: n for n in names}

    def read(name: str) -> bytes:
        return archive.read(files[name])

    models = sorted(n[len("models/"):-len(".json")] for n in files
                    if n.startswith("models/") and n.endswith(".json"))
    if "archive_version" not in files or "model" not in models:
        raise TokenizerSpecError(f"cannot load exported program {uri}: no models/model.json in the archive "
                                 "(not written by torch.export.save, or by a torch older than 2.8)")
    for n in files:
        if n.startswith("data/aotinductor/"):
            raise TokenizerSpecError(f"{uri} holds an AOTInductor library (a compiled .so that loading would "
                                     "run): refused; save the program with torch.export.save")
        if n.endswith(".pt") and (n.startswith("data/weights/") or n.startswith("data/constants/")):
            raise TokenizerSpecError(f"{uri} stores {n} in the legacy pickled layout: refused; save it again "
                                     "with torch.export.save (torch 2.8 or newer)")
    try:
        for model in models:
            where = f"{uri} ({model})"
            for kind in ("weights", "constants"):
                config = files.get(f"data/{kind}/{model}_{kind}_config.json")
                if config is None:
                    raise TokenizerSpecError(f"cannot load exported program {uri}: no {kind} config for {model}")
                for fqn, meta in json.loads(archive.read(config)).get("config", {}).items():
                    if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(_PICKLED_PREFIXES):
                        raise TokenizerSpecError(f"{where}: {kind[:-1]} {fqn!r} is stored with pickle (a tensor "
                                                 "subclass or a Python object): refused")
            _check_program_json(json.loads(read(f"models/{model}.json")), where)
            sample = files.get(f"data/sample_inputs/{model}.pt")
            if sample is not None:
                import torch

                try:  # torch would retry with weights_only=False; this one never does
                    torch.load(io.BytesIO(archive.read(sample)), weights_only=True)
                except Exception:
                    raise TokenizerSpecError(f"{where}: its example inputs are more than tensors and cannot be "
                                             "loaded with weights_only=True: refused") from None
    except TokenizerSpecError:
        raise
    except Exception as e:  # a damaged member, JSON that is not the schema: one line, never a traceback
        raise TokenizerSpecError(f"cannot load exported program {uri}: damaged archive ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None


def load_program(data: bytes, uri: str) -> tuple[Any, dict[str, str]]:
    """(the ExportedProgram in a .pt2's bytes, its extra files we ask for), after the checks of
    `_check_archive`; TokenizerSpecError if it cannot be loaded safely."""
    import torch

    _check_archive(data, uri)
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=(extra := {"vocab_size": ""}))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerSpecError(f"cannot load exported program {uri}: {first}") from None
    allowed = (torch._ops.OpOverload, torch._ops.HigherOrderOperator)
    for module in program.graph_module.modules():
        for node in module.graph.nodes if isinstance(module, torch.fx.GraphModule) else ():
            if node.op == "call_function" and not isinstance(node.target, allowed) \
                    and getattr(node.target, "__module__", None) not in ("_operator", "operator", "math"):
                raise TokenizerSpecError(f"{uri} calls {node.target!r}, which is not a torch operator: refused")
    return program, extra


def _input_placeholder(program):
    """The fake tensor of the program's first user input (its shape's ints are fixed, SymInts are dynamic)."""
    from torch.export.graph_signature import InputKind

    name = next(s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT)
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return node.meta.get("val")


class ExportedModel(EncoderModel):
    family, what = "export", "exported program"

    def _load(self, data: bytes):
        import torch

        self.program, self.extra_files = load_program(data, self.uri)
        val = _input_placeholder(self.program)
        if val is not None:
            if val.dtype != self.torch_dtype:
                given = latent_dtype_of(val.dtype) if val.dtype.is_floating_point else str(val.dtype)
                raise TokenizerSpecError(
                    f"{self.uri} was exported for {given} inputs; --dtype {self.dtype} needs a program exported in "
                    f"{latent_dtype_of(self.torch_dtype)} (export the module after .to(dtype) with an input of that "
                    "dtype), or pass the --dtype it was exported for")
            if isinstance(val.shape[0], int):
                self.max_batch = val.shape[0]
        if self.device != "cpu":
            from torch.export.passes import move_to_device_pass

            self.program = move_to_device_pass(self.program, self.device)
        return self.program.module()

    def _probe_shape(self, default: tuple[int, ...]) -> tuple[int, ...]:
        """The program's own example input, channels last, with batch 1 (or its fixed batch)."""
        example = self.program.example_inputs
        args = example[0] if example else ()
        if not args or getattr(args[0], "dim", lambda: 0)() != len(default):
            return default
        shape = list(args[0].shape)
        shape[0] = self.max_batch or 1
        return (shape[0], *shape[2:], shape[1])

    def _declared_vocab_size(self) -> int | None:
        for table in (self.program.state_dict, self.program.constants):
            for fqn, value in table.items():
                if fqn.rsplit(".", 1)[-1] in _VOCAB_NAMES and getattr(value, "numel", lambda: 0)() == 1 \
                        and not value.dtype.is_floating_point:
                    return int(value.item())
        text = self.extra_files.get("vocab_size", "").strip()
        return int(text) if text.isdigit() else None

    def _refusal(self, e: Exception, x) -> Exception:
        shape = "x".join(str(d) for d in x.shape)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ValueError(f"the exported program failed on input {shape} (a shape outside those it was exported "
                          f"for?): {first}")


class ExportedImageTokenizer(NeuralImageTokenizer):
    model_class = ExportedModel


class ExportedVideoTokenizer(NeuralVideoTokenizer):
    model_class = ExportedModel


def load(spec: str, arg: str, modality: str, **options: Any):
    return load_family(ExportedImageTokenizer, ExportedVideoTokenizer, spec, arg, modality, **options)


def _family():
    from tokenmill.transforms.registry import TokenizerFamily

    return TokenizerFamily("export", ("image", "video"), ("export:PATH_OR_URI",),
                           loader=f"{__name__}:load", options=neural_options(), extra="torch", requires=("torch",))


FAMILY = _family()
