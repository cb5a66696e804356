"""Save and load quantized models; import AutoAWQ and GPTQ checkpoints.

A qcompile checkpoint is a folder:
    model.safetensors         every tensor of the state dict, packed int4 buffers included;
                              a tied tensor (lm_head tied to the embeddings) is stored once
    quantization_config.json  format version, scheme, each quantized layer's path, kind
                              ("w4a16": W4A16Linear, "w4a8": W4A8Linear), features, group size
                              and tensor shapes/dtypes, the tied names, qcompile's version
    config.json               for a transformers model: its config (architecture, dtype)
Loading never unpickles: tensors come from safetensors, everything else from JSON. The model
is built with its parameters on the meta device (no fp16 weight is allocated), quantized
layers are swapped in at the recorded paths, and every tensor is checked by name, shape and
dtype before any is loaded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qcompile.config import GROUP_SIZES, Scheme
from qcompile.integrations import CheckpointError
from qcompile.integrations.awq import AwqFormat
from qcompile.integrations.gptq import GptqFormat
from qcompile.integrations.hf_quantizer import mark_quantized
from qcompile.quant.int4 import NIBBLES_PER_WORD, PackedInt4
from qcompile.quant.w4a8 import PackedW4A8
from qcompile.quantize import W4A8Linear, W4A16Linear, colocate_siblings

WEIGHTS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "quantization_config.json"
FORMAT = "qcompile"
FORMAT_VERSION = 1
IMPORTERS = {"awq": AwqFormat, "gptq": GptqFormat}
# Tensors old checkpoints carry that current transformers models compute instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64)
    + (torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

ModelBuilder = Callable[[], nn.Module]


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a quantized `model` (after `quantize_` or `import_checkpoint`) to the folder `path`.

    Returns the folder. A transformers model also gets its `config.json`, with the record as
    its `quantization_config` (quant_method "qcompile"), so `load_quantized` rebuilds it
    without code and transformers' `from_pretrained` loads it (`integrations.hf_quantizer`).
    """
    record = quantization_record(model)
    state = model.state_dict()
    tensors = _unshared({n: t.detach() for n, t in state.items() if n not in record["tied"]})
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    (folder / QUANT_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    if _is_transformers_model(model):
        from qcompile.integrations.hf_quantizer import QUANT_METHOD

        config = copy.deepcopy(model.config)
        config.dtype = model.dtype
        config.architectures = [type(model).__name__]
        config.quantization_config = {"quant_method": QUANT_METHOD, **record}
        config.save_pretrained(folder)
    return folder


def quantization_record(model: nn.Module) -> dict:
    """The checkpoint's description of `model`'s quantized layers (quantization_config.json)."""
    from qcompile import __version__

    layers = {n: m for n, m in model.named_modules() if isinstance(m, (W4A16Linear, W4A8Linear))}
    if not layers:
        raise CheckpointError(
            f"save_quantized: {type(model).__name__} has no W4A16Linear or W4A8Linear layer; "
            "call qcompile.quantize_(model) first"
        )
    state = model.state_dict()
    on_meta = [name for name, t in state.items() if t.is_meta]
    if on_meta:
        raise CheckpointError(f"save_quantized: {on_meta[0]} is on the meta device (no data)")
    schemes = {json.dumps(_scheme_record(m.scheme)) for m in layers.values()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "qcompile_version": __version__,
        "architecture": type(model).__name__,
        "scheme": json.loads(schemes.pop()) if len(schemes) == 1 else None,
        "modules": {name: _layer_record(m) for name, m in layers.items()},
        "tied": _tied_aliases(model, state.keys()),
    }


def load_quantized(
    path: str | os.PathLike[str],
    model: nn.Module | ModelBuilder | None = None,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a model written by `save_quantized`.

    `model`: None builds the transformers architecture from `config.json`; a callable is called
    with parameter allocation on the meta device; a module is used as it is. Either way its
    parameters are replaced by the checkpoint's tensors. Raises `CheckpointError` naming every
    missing or unexpected tensor and every shape or dtype mismatch.
    """
    folder = Path(path)
    record = read_quantization_config(folder)
    files = TensorFiles.in_folder(folder)  # model.safetensors, or save_pretrained's shards
    if model is None:
        skeleton = _transformers_skeleton(folder)
    elif isinstance(model, nn.Module):
        skeleton = model
    else:
        with parameters_on_meta():
            skeleton = model()
    for name, entry in record["modules"].items():
        _install_layer(skeleton, name, entry)
    _load_checked(skeleton, files, dict(record["tied"]))
    skeleton.eval()
    if device is not None:
        skeleton.to(device)
    colocate_siblings(skeleton)  # the skeleton's siblings were loaded as separate tensors
    mark_quantized(skeleton)
    return skeleton


def read_quantization_config(folder: Path) -> dict:
    """The record of a qcompile checkpoint: its `quantization_config.json`, or the
    `quantization_config` of its config.json (quant_method "qcompile", as `save_pretrained`
    writes it), after the format check."""
    file = folder / QUANT_CONFIG_NAME
    if file.is_file():
        return check_record(json.loads(file.read_text()), str(file))
    source = _qcompile_config_json(folder)
    if source is None:
        raise CheckpointError(f"{folder}: no {QUANT_CONFIG_NAME}; not a qcompile checkpoint")
    return check_record(source, str(folder / "config.json"))


def check_record(record: dict, where: str) -> dict:
    """`record` if this qcompile reads its format, else a `CheckpointError` naming `where`."""
    record = {k: v for k, v in record.items() if k != "quant_method"}
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format={record.get('format')!r}, expected {FORMAT!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version={record.get('format_version')!r}; this qcompile reads "
            f"version {FORMAT_VERSION} (upgrade qcompile for newer checkpoints)"
        )
    for key in ("modules", "tied"):
        if not isinstance(record.get(key), dict):
            raise CheckpointError(f"{where}: {key!r} is missing or not a mapping")
    return record


def _qcompile_config_json(folder: Path) -> dict | None:
    """config.json's quantization_config when its quant_method is "qcompile"."""
    from qcompile.integrations.hf_quantizer import QUANT_METHOD

    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    source = json.loads(config_file.read_text()).get("quantization_config")
    if isinstance(source, dict) and source.get("quant_method") == QUANT_METHOD:
        return source
    return None


def import_checkpoint(
    path: str | os.PathLike[str], *, dtype: torch.dtype | None = None
) -> nn.Module:
    """Build a transformers model with `W4A16Linear` layers from a local AWQ or GPTQ folder.

    The format comes from `config.json`'s `quantization_config.quant_method` ("awq": AutoAWQ
    GEMM, "gptq": GPTQ v1/v2, act-order included), else from AutoGPTQ's
    `quantize_config.json` or AutoAWQ's `quant_config.json`; a qcompile checkpoint is handed
    to `load_quantized`. `dtype` overrides the config's dtype; other floating tensors are cast
    to it, as `from_pretrained` does. With a float32 model, scales and offsets are stored in
    float32 (exact); otherwise in the checkpoint's scale dtype (see
    `qcompile.quant.int4.offsets_from_zero_points` for the rounding of the offsets).
    """
    folder = Path(path)
    if (folder / QUANT_CONFIG_NAME).is_file():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads((folder / QUANT_CONFIG_NAME).read_text()).get("format") == FORMAT:
                return load_quantized(folder)
    if _qcompile_config_json(folder) is not None:
        return load_quantized(folder)
    source = _source_quantization_config(folder)
    method = str(source.get("quant_method", "")).lower()
    if method not in IMPORTERS:
        raise CheckpointError(
            f"{folder}: quant_method={method!r} is not supported; import_checkpoint reads "
            f"{sorted(IMPORTERS)} checkpoints"
        )
    fmt = IMPORTERS[method].from_config(source)
    model = _transformers_skeleton(folder, dtype)
    model_dtype = model.dtype
    files = TensorFiles.in_folder(folder)
    stored = [n.removesuffix(".qweight") for n in files.names() if n.endswith(".qweight")]
    if not stored:
        raise CheckpointError(f"{folder}: no *.qweight tensor; is this a {method} checkpoint?")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    prefixes = sorted(stored, key=lambda p: (order.get(p, -1), p))  # model order, unknown first
    consumed: set[str] = set()
    for prefix in prefixes:
        linear = _module_or_none(model, prefix)
        if type(linear) is not nn.Linear:
            raise CheckpointError(
                f"{prefix}.qweight: the {type(model).__name__} built from config.json has "
                f"{'no module' if linear is None else type(linear).__name__} at {prefix!r}, "
                "expected nn.Linear"
            )
        names = {t: f"{prefix}.{t}" for t in (*fmt.tensor_names, "bias")}
        tensors = {t: files.get(n) if n in files else None for t, n in names.items()}
        scales = tensors["scales"]
        storage = torch.float32 if model_dtype == torch.float32 or scales is None else scales.dtype
        k, n = linear.in_features, linear.out_features
        imported = fmt.convert(prefix, tensors, k, n, storage)
        bias = tensors["bias"]
        if bias is not None and tuple(bias.shape) != (n,):
            raise CheckpointError(f"{prefix}.bias: expected [{n}], got {list(bias.shape)}")
        layer = W4A16Linear(
            imported.packed,
            None if bias is None else bias.to(model_dtype),
            imported.perm,
            _scheme_or_none(imported.packed.group_size, k, imported.symmetric),
        )
        _replace(model, prefix, layer)
        consumed |= {n for n in names.values() if n in files}
    converted = {f"{p}.{b}" for p in prefixes for b in ("qweight", "scales", "offsets", "bias")}
    converted |= {f"{p}.perm" for p in prefixes}
    aliases = _tie_sources(model, files)
    _load_checked(model, files, aliases, cast_floats=True, done=converted, ignore=consumed)
    model.eval()
    colocate_siblings(model)
    mark_quantized(model)
    return model


class TensorFiles:
    """The tensors of one or more safetensors files, read lazily by name (never unpickled)."""

    def __init__(self, files: list[Path]):
        self._file: dict[str, Path] = {}
        self._handles = {}
        for file in files:
            handle = safe_open(str(file), framework="pt", device="cpu")
            self._handles[file] = handle
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name in self._file:
                    raise CheckpointError(f"{name}: stored in both {self._file[name]} and {file}")
                self._file[name] = file

    @classmethod
    def in_folder(cls, folder: Path) -> TensorFiles:
        """`model.safetensors`, the shards of `model.safetensors.index.json`, or all files."""
        index = folder / f"{WEIGHTS_NAME}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if any(Path(s).name != s for s in shards):
                raise CheckpointError(f"{index}: shard names must be plain file names")
            return cls([folder / s for s in shards])
        if (folder / WEIGHTS_NAME).is_file():
            return cls([folder / WEIGHTS_NAME])
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{folder}: no .safetensors file")
        return cls(files)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def names(self) -> list[str]:
        return list(self._file)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """(shape, dtype) from the file header, without reading the data."""
        tensor_slice = self._handles[self._file[name]].get_slice(name)
        st_dtype = tensor_slice.get_dtype()
        return tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES.get(st_dtype, st_dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._file[name]].get_tensor(name)

    def where(self, name: str) -> str:
        return self._file[name].name


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside are moved to the meta device as they are registered.

    Buffers stay real, so computed non-persistent buffers (RoPE's inv_freq) keep their values.
    Each parameter is allocated (uninitialised) only until its module registers it. Patches
    `nn.Module.register_parameter` while active, so it is not thread-safe.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load_checked(
    model: nn.Module,
    files: TensorFiles,
    aliases: dict[str, str],
    *,
    cast_floats: bool = False,
    done: set[str] = frozenset(),
    ignore: set[str] = frozenset(),
) -> None:
    """Check every state-dict entry of `model` against `files`, then load them all.

    `aliases` maps a tied name to the name it is stored under; `done` are entries already
    filled (imported layers); `ignore` are file tensors already used. With `cast_floats`, a
    floating tensor may have another floating dtype (it is converted).
    """
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items() if n not in done}
    problems = []
    for name, t in expected.items():
        source = aliases.get(name, name)
        want = _describe(tuple(t.shape), t.dtype)
        if source not in files:
            tied = f" (tied to {source})" if source != name else ""
            problems.append(f"missing tensor {name}{tied}: expected {want}")
            continue
        shape, dtype = files.spec(source)
        float_cast = cast_floats and isinstance(dtype, torch.dtype)
        float_cast = float_cast and dtype.is_floating_point and t.dtype.is_floating_point
        if shape != tuple(t.shape) or (dtype != t.dtype and not float_cast):
            problems.append(f"{source}: expected {want}, got {_describe(shape, dtype)}")
    used = {aliases.get(n, n) for n in expected}
    for name in files.names():
        if name not in used and name not in ignore and not name.endswith(_IGNORED_SUFFIXES):
            shape, dtype = files.spec(name)
            problems.append(
                f"unexpected tensor {name} ({_describe(shape, dtype)}): the model has no such entry"
            )
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"the checkpoint's tensors do not match {type(model).__name__}:\n  {shown}{more}"
        )
    loaded: dict[str, torch.Tensor] = {}
    state = {}
    for name, t in expected.items():
        source = aliases.get(name, name)
        if source not in loaded:
            loaded[source] = files.get(source)
        state[name] = loaded[source].to(t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    for alias, source in aliases.items():  # assign gave each name its own Parameter: re-tie
        if alias in expected:
            _set_tensor(model, alias, _get_tensor(model, source))
    for name, t in chain(model.named_parameters(), model.named_buffers()):
        if t.is_meta:
            raise CheckpointError(
                f"{name} is still on the meta device: it is neither in the checkpoint nor "
                "computed by the model (build the model with real buffers)"
            )


# Per layer kind: its module class, the tensors it must have, and the shape of each tensor
# it may have for a layer [N, K] with group size G (besides qweight [K / 8, N], bias [N]).
_KINDS = {
    "w4a16": (
        W4A16Linear,
        ("qweight", "scales", "offsets"),
        lambda n, k, g: {"scales": (k // g, n), "offsets": (k // g, n), "perm": (k,)},
    ),
    "w4a8": (
        W4A8Linear,
        ("qweight", "group_scales", "group_zeros", "channel_scales"),
        lambda n, k, g: {
            "group_scales": (k // g, n),
            "group_zeros": (k // g, n),
            "channel_scales": (n,),
        },
    ),
}


def _install_layer(model: nn.Module, name: str, entry: dict) -> None:
    """Swap the module at `name` for a W4A16Linear or W4A8Linear (the entry's "kind"; version-1
    files before W4A8 have none: W4A16) with meta tensors of the recorded shapes."""
    kind = entry.get("kind", "w4a16")
    if kind not in _KINDS:
        raise CheckpointError(
            f"{name}: unknown layer kind {kind!r} (this qcompile reads {sorted(_KINDS)})"
        )
    cls, required_tensors, kind_shapes = _KINDS[kind]
    current = _module_or_none(model, name)
    if not isinstance(current, (nn.Linear, W4A16Linear, W4A8Linear)):
        found = "no module" if current is None else type(current).__name__
        raise CheckpointError(
            f"{name}: {QUANT_CONFIG_NAME} records a {cls.__name__} here, the model has {found}"
        )
    k, n, g = current.in_features, current.out_features, entry["group_size"]
    if (entry["in_features"], entry["out_features"]) != (k, n):
        raise CheckpointError(
            f"{name}: the checkpoint holds a layer with in_features={entry['in_features']}, "
            f"out_features={entry['out_features']}; the model's has {k}, {n}"
        )
    kp = entry.get("padded_in_features", k)  # Scheme.pad_k: K stored as whole groups
    padded = f" padded to {kp}" if kp != k else ""
    if g <= 0 or kp % g or kp % NIBBLES_PER_WORD:
        raise CheckpointError(
            f"{name}: group_size={g} does not divide K={k}{padded} into whole groups"
        )
    if not k <= kp < k + g:
        raise CheckpointError(
            f"{name}: K={k}{padded} is not K padded to whole groups of {g} (the padding is "
            "less than one group)"
        )
    shapes = {"qweight": (kp // NIBBLES_PER_WORD, n), "bias": (n,), **kind_shapes(n, kp, g)}
    tensors = entry["tensors"]
    meta = {}
    for tname, spec in tensors.items():
        if tname not in shapes:
            raise CheckpointError(f"{name}.{tname}: not a {cls.__name__} tensor")
        if tuple(spec["shape"]) != shapes[tname] or spec["dtype"] not in _DTYPES:
            raise CheckpointError(
                f"{name}.{tname}: {QUANT_CONFIG_NAME} records {spec['shape']} {spec['dtype']}, "
                f"a layer [N, K] = [{n}, {k}] with group_size={g} needs {list(shapes[tname])}"
            )
        meta[tname] = torch.empty(shapes[tname], dtype=_DTYPES[spec["dtype"]], device="meta")
    for required in required_tensors:
        if required not in meta:
            raise CheckpointError(f"{name}.{required}: missing from {QUANT_CONFIG_NAME}")
    scheme = _scheme_from_record(entry.get("scheme"), name)
    if kind == "w4a8":
        if scheme is None or scheme.name != "w4a8":
            raise CheckpointError(
                f"{name}: a w4a8 layer needs a w4a8 scheme, got {entry.get('scheme')}"
            )
        packed8 = PackedW4A8(*(meta[t] for t in required_tensors), g)
        _replace(model, name, W4A8Linear(packed8, meta.get("bias"), scheme, in_features=k))
        return
    packed = PackedInt4(meta["qweight"], meta["scales"], meta["offsets"], g)
    layer = W4A16Linear(packed, meta.get("bias"), meta.get("perm"), scheme, in_features=k)
    _replace(model, name, layer)


def _transformers_skeleton(folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The architecture of `folder/config.json` with its parameters on the meta device."""
    import transformers

    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder}: no config.json; pass `model=` (a module or a builder) for a model "
            "that is not a transformers model"
        )
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the layers become W4A16Linear, not AWQ/GPTQ modules
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    kwargs = {} if dtype is None else {"dtype": dtype}
    with parameters_on_meta():
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            model = cls._from_config(config, **kwargs)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def _source_quantization_config(folder: Path) -> dict:
    """config.json's quantization_config, or AutoGPTQ's / AutoAWQ's own file."""
    config_file = folder / "config.json"
    if config_file.is_file():
        source = json.loads(config_file.read_text()).get("quantization_config")
        if source is not None:
            return dict(source)
    for name, method in (("quantize_config.json", "gptq"), ("quant_config.json", "awq")):
        if (folder / name).is_file():
            return {"quant_method": method, **json.loads((folder / name).read_text())}
    raise CheckpointError(
        f"{folder}: no quantization_config in config.json and no quantize_config.json "
        "(GPTQ) or quant_config.json (AWQ); not a quantized checkpoint"
    )


def _tied_aliases(model: nn.Module, names) -> dict[str, str]:
    """{name: first name of the same tensor} for every state-dict entry that repeats one."""
    names = set(names)
    first: dict[int, str] = {}
    aliases = {}
    named = chain(
        model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
    )
    for name, t in named:
        if name in names:
            source = first.setdefault(id(t), name)
            if source != name:
                aliases[name] = source
    return aliases


def _tie_sources(model: nn.Module, files: TensorFiles) -> dict[str, str]:
    """For each group of tied entries of `model`, every name -> the one the files store."""
    state_names = model.state_dict(keep_vars=True).keys()
    groups: dict[str, list[str]] = {}
    for alias, source in _tied_aliases(model, state_names).items():
        groups.setdefault(source, [source]).append(alias)
    aliases = {}
    for members in groups.values():
        stored = next((m for m in members if m in files), members[0])
        aliases.update({m: stored for m in members if m != stored})
    return aliases


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor alone in a storage it fills: safetensors refuses tensors sharing memory, so a
    view (co-located sibling buffers, `colocate_siblings`) or a second use of a storage is
    written as its own contiguous copy; the file is the one an un-co-located model gives."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        if t.numel() and (ptr in seen or not whole):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ptr)
        out[name] = t.contiguous()
    return out


def _layer_record(layer: W4A16Linear | W4A8Linear) -> dict:
    buffers = {n: b for n, b in layer.named_buffers(recurse=False) if b is not None}
    padded = layer.qweight.shape[0] * NIBBLES_PER_WORD
    extra = {"padded_in_features": padded} if padded != layer.in_features else {}
    return {
        **extra,
        "kind": "w4a8" if isinstance(layer, W4A8Linear) else "w4a16",
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "group_size": layer.group_size,
        "scheme": _scheme_record(layer.scheme),
        "tensors": {
            n: {"shape": list(b.shape), "dtype": str(b.dtype).removeprefix("torch.")}
            for n, b in buffers.items()
        },
    }


def _scheme_record(scheme: Scheme | None) -> dict | None:
    if scheme is None:
        return None
    record = dataclasses.asdict(scheme)
    if not record["pad_k"]:  # (the default: files stay as before pad_k existed)
        del record["pad_k"]
    return record


def _scheme_from_record(record: dict | None, layer: str = "") -> Scheme | None:
    if record is None:
        return None
    try:
        return Scheme(**record)
    except (TypeError, ValueError) as e:
        where = f" of {layer}" if layer else ""
        raise CheckpointError(f"{QUANT_CONFIG_NAME}: invalid scheme{where} {record}: {e}") from e


def _scheme_or_none(group_size: int, k: int, symmetric: bool) -> Scheme | None:
    """The `Scheme` an imported layer matches, or None when its group size has none."""
    if group_size == k:
        return Scheme(group_size=None, symmetric=symmetric)
    if group_size in GROUP_SIZES:
        return Scheme(group_size=group_size, symmetric=symmetric)
    return None


def _describe(shape: tuple[int, ...], dtype: torch.dtype | str) -> str:
    return f"{list(shape)} {str(dtype).removeprefix('torch.')}"


def _module_or_none(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, value)


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)
