"""A torch.export archive (.pt2) checked for everything that would run code before torch.export.load reads it.

torch.export.load (torch 2.14) unpickles with weights_only=False: weights and constants marked use_pickle, the
legacy data/weights/<model>.pt and data/constants/<model>.pt files, a pre-2.8 archive's serialized_*.pt, and the
sample inputs whenever weights_only loading refuses them; it unpickles torchbind and opaque objects (custom_obj_*,
opaque_obj_*), loads AOTInductor shared libraries (data/aotinductor/), eval()s each symbolic shape expression
through sympy.sympify, exec()s the program's guard code when the module runs, and calls whatever torch.* or
operator.* function a graph node names. job/registry.py's export writes none of these: raw tensor bytes, sample
inputs of plain tensors, aten operators, shape symbols. check() refuses anything else in one line.
"""

import io
import json
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import sympy
import torch
import torch.utils._sympy.functions as torch_sympy

from job.checkpoint import CheckpointError
from job.cli import first_line

# every record an archive of torch.export.save may hold here (names below the archive's one top folder)
RECORDS = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                     r"|models/(?P<model>\w+)\.json|data/weights/\w+_weights_config\.json|data/weights/weight_\d+"
                     r"|data/constants/\w+_constants_config\.json|data/constants/tensor_\d+"
                     r"|data/sample_inputs/\w+\.pt|extra/[\w.-]+")
# graph node targets that torch.export.load resolves to a callable: aten / prims operators and symbolic-shape
# arithmetic; any other torch.* name (torch.load, torch.os.system) would be called as found
OPERATOR = re.compile(r"(?!.*__)(torch\.ops\.(aten|prims)\.\w+(\.\w+)?|torch\.sym_\w+"
                      r"|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|pow|neg|eq|ne|lt|le|gt|ge|and_|or_|not_)"
                      r"|math\.(ceil|floor|trunc|sqrt))")
# what an srepr of a shape expression is made of: class names called with numbers and quoted names or numbers
SYMPY_NAMES = ({name for name, value in vars(sympy).items()
                if isinstance(value, type) and value.__module__.startswith("sympy.")}
               | {name for name, value in vars(torch_sympy).items() if isinstance(value, type)}
               | {"True", "False", "None"})
# quoted parts are symbol names only (s0, s77): sympy would evaluate a dotted path such as 'Symbol.__init__' again
EXPRESSION = re.compile(r"(?:[A-Za-z]\w*|'[a-z]+\d*'|\d[\d.]*(?:e[+-]?\d+)?|[\s(),=+*/<>%&|~-])*")


def load(path: str) -> torch.export.ExportedProgram:
    """check() and torch.export.load on one private copy of the file: what is loaded is what was checked, even
    when someone rewrites path on a shared volume in between."""
    with tempfile.TemporaryDirectory() as private:  # mode 0700: only this user can swap the copy
        copy = Path(private) / "model.pt2"
        try:
            shutil.copyfile(path, copy)
        except OSError as e:
            raise CheckpointError(f"cannot read exported model {path}: {e.strerror}") from None
        check(copy, shown=path)
        try:
            return torch.export.load(copy)
        except Exception as e:
            raise CheckpointError(f"cannot load exported model {path}: {first_line(e)}") from None


def check(path: str | Path, shown: str | None = None) -> None:
    """Refuse, in one CheckpointError line naming shown (default: path), an archive torch.export.load would run
    code from (see the module)."""
    why = _unsafe(Path(path))
    if why:
        raise CheckpointError(f"refusing exported model {shown or path}: {why}; only a .pt2 of raw tensors and aten "
                              f"operators is loaded (job/exported.py)")


def _unsafe(path: Path) -> str | None:
    """What in the archive would run code when loaded (None: nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        records = torch._C.PyTorchFileReader(str(path))  # the reader torch.export.load uses
        held = records.get_all_records()
    except Exception as e:
        return f"not a torch.export archive ({type(e).__name__})"
    root = names[0].split("/")[0] if names else ""
    if len(set(names)) != len(names) or sorted(f"{root}/{r}" for r in held) != sorted(names):
        return "its zip directory lists records twice or differently to different readers"
    others = [r for r in held if not RECORDS.fullmatch(r)]
    if others:
        return f"it holds {others[0]}, which torch.export.load would unpickle or run (or does not know)"
    for model in (m.group("model") for m in map(RECORDS.fullmatch, held) if m.group("model")):
        try:
            why = (_payloads(records, f"data/weights/{model}_weights_config.json", "weight_")
                   or _payloads(records, f"data/constants/{model}_constants_config.json", "tensor_")
                   or _sample_inputs(records, f"data/sample_inputs/{model}.pt")
                   or _program(json.loads(records.get_record(f"models/{model}.json"))))
        except Exception as e:  # a record missing, JSON that is not torch.export's
            why = f"it is malformed ({type(e).__name__})"
        if why:
            return f"model {model!r}: {why}"
    return None


def _payloads(records, config: str, prefix: str) -> str | None:
    """A weights or constants config whose every payload is raw tensor bytes."""
    for name, meta in json.loads(records.get_record(config))["config"].items():
        if meta.get("use_pickle") is not False or not re.fullmatch(rf"{prefix}\d+", str(meta.get("path_name"))):
            return f"{name} is a pickled payload ({config})"
    return None


def _sample_inputs(records, name: str) -> str | None:
    """Sample inputs that load with weights_only=True: torch falls back to unpickling them in full otherwise."""
    try:
        torch.load(io.BytesIO(records.get_record(name)), weights_only=True)
    except Exception:
        return f"its sample inputs ({name}) are not plain tensors: torch would unpickle them in full"
    return None


def _program(tree) -> str | None:
    """No guard code, operators only of OPERATOR, shape expressions only of SYMPY_NAMES."""
    if isinstance(tree, list):
        return next(filter(None, map(_program, tree)), None)
    if not isinstance(tree, dict):
        return None
    if tree.get("guards_code"):
        return "it carries guard code, which runs as Python"
    for key, value in tree.items():
        if key in ("target", "as_operator") and isinstance(value, str) and not OPERATOR.fullmatch(value):
            return f"a graph node calls {value[:80]}, not an aten operator"
        if key == "expr_str" and not _plain_expression(str(value)):
            return f"the shape expression {str(value)[:80]!r} is not plain sympy, and it would be eval()ed"
    return next(filter(None, map(_program, tree.values())), None)


def _plain_expression(text: str) -> bool:
    """Whether text is only sympy class names, keywords, numbers, quoted names and operators (srepr's output)."""
    if "__" in text or not EXPRESSION.fullmatch(text):
        return False
    unquoted = re.sub(r"'[a-z]+\d*'", "", text)
    names = set(re.findall(r"\b[A-Za-z]\w*\b(?!\s*=(?!=))", unquoted))  # keyword names (positive=) are inert
    return all(name in SYMPY_NAMES or re.fullmatch(r"[a-z]+\d+", name) for name in names)
