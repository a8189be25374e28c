"""Attention shapes of diffusion transformers, loaded from YAML model specs.

Presets live in ``fgattn_gen/presets/<name>.yaml``; a custom model is a YAML file in the same schema::

    name: my-model                # [A-Za-z0-9._-]+, names the tuned file
    description: optional text
    heads: 24                     # attention heads per layer
    head_dim: 128                 # 64 or 128
    dtype: bf16                   # bf16 or fp16
    block_m: 128                  # KeySet query block
    block_n: 1                    # KeySet key granularity
    batch: 1                      # optional, default 1
    text_first: false             # optional: the text tokens come before the video (CogVideoX)
    densities: [1.0, 0.3, 0.1]    # key densities to tune for, each in (0, 1]
    shapes:                       # one self-attention shape per resolution / clip length
      - {name: 480p-81f, video_tokens: 32760, text_tokens: 0, grid: [21, 30, 52]}

A shape's sequence length is ``video_tokens + text_tokens`` (joint self-attention over both; models that
take text through cross-attention list ``text_tokens: 0``). ``grid`` (optional): the latent frames x height x
width of the video tokens (their product), which ``fgattn_gen.ditdata`` needs to generate DiT-like data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from .variant import DTYPES, HEAD_DIMS

_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class ModelSpecError(ValueError):
    """A model name that is not a preset, or a model spec that breaks the schema."""


@dataclass(frozen=True)
class AttentionShape:
    """One self-attention call of a model: ``seq = video_tokens + text_tokens`` queries and keys."""

    name: str
    video_tokens: int
    text_tokens: int
    grid: tuple[int, int, int] | None = None  # latent frames, height, width of the video tokens

    @property
    def seq(self) -> int:
        return self.video_tokens + self.text_tokens


@dataclass(frozen=True)
class ModelSpec:
    """A model's attention layout and the shapes and densities to tune it for."""

    name: str
    description: str
    batch: int
    heads: int
    head_dim: int
    dtype: str
    block_m: int
    block_n: int
    densities: tuple[float, ...]
    shapes: tuple[AttentionShape, ...]
    text_first: bool = False


def _presets_dir():
    return resources.files("fgattn_gen") / "presets"


def preset_names() -> list[str]:
    """Names of the bundled model presets, sorted."""
    return sorted(p.name[: -len(".yaml")] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def _positive_int(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelSpecError(f"{where}: expected a positive int, got {value!r}")
    return value


def _density(value, where: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ModelSpecError(f"{where}: expected a number in (0, 1], got {value!r}")
    return float(value)


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise ModelSpecError(f"{where}: expected true or false, got {value!r}")
    return value


def _check_keys(data, required: set[str], optional: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ModelSpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    missing = sorted(required - data.keys())
    unknown = sorted(data.keys() - required - optional)
    if missing:
        raise ModelSpecError(f"{where}: missing key(s) {', '.join(missing)}")
    if unknown:
        raise ModelSpecError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} "
                             f"(allowed: {', '.join(sorted(required | optional))})")


def _parse_shape(data, where: str) -> AttentionShape:
    _check_keys(data, {"name", "video_tokens", "text_tokens"}, {"grid"}, where)
    if not isinstance(data["name"], str) or not _NAME.match(data["name"]):
        raise ModelSpecError(f"{where}.name: expected a name of [A-Za-z0-9._-], got {data['name']!r}")
    text = data["text_tokens"]
    if not isinstance(text, int) or isinstance(text, bool) or text < 0:
        raise ModelSpecError(f"{where}.text_tokens: expected an int >= 0, got {text!r}")
    video = _positive_int(data["video_tokens"], f"{where}.video_tokens")
    grid = data.get("grid")
    if grid is not None:
        if not isinstance(grid, list) or len(grid) != 3:
            raise ModelSpecError(f"{where}.grid: expected [frames, height, width], got {grid!r}")
        grid = tuple(_positive_int(g, f"{where}.grid") for g in grid)
        if grid[0] * grid[1] * grid[2] != video:
            raise ModelSpecError(f"{where}.grid: {grid[0]} x {grid[1]} x {grid[2]} is not video_tokens = {video}")
    return AttentionShape(data["name"], video, text, grid)


def parse_model_spec(data, source: str) -> ModelSpec:
    """Validate a parsed YAML document against the model schema; errors name ``source`` and the key."""
    _check_keys(data, {"name", "heads", "head_dim", "dtype", "block_m", "block_n", "densities", "shapes"},
                {"description", "batch", "text_first"}, source)
    name = data["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelSpecError(f"{source}: name: expected a name of [A-Za-z0-9._-], got {name!r}")
    if data["head_dim"] not in HEAD_DIMS:
        raise ModelSpecError(f"{source}: head_dim: expected one of {HEAD_DIMS}, got {data['head_dim']!r}")
    if data["dtype"] not in DTYPES:
        raise ModelSpecError(f"{source}: dtype: expected one of {tuple(DTYPES)}, got {data['dtype']!r}")
    for key in ("densities", "shapes"):
        if not isinstance(data[key], list) or not data[key]:
            raise ModelSpecError(f"{source}: {key}: expected a non-empty list, got {data[key]!r}")
    shapes = tuple(_parse_shape(s, f"{source}: shapes[{i}]") for i, s in enumerate(data["shapes"]))
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise ModelSpecError(f"{source}: shapes: names must be unique, got {names}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ModelSpecError(f"{source}: description: expected a string, got {description!r}")
    return ModelSpec(
        name=name, description=description,
        batch=_positive_int(data.get("batch", 1), f"{source}: batch"),
        heads=_positive_int(data["heads"], f"{source}: heads"),
        head_dim=data["head_dim"], dtype=data["dtype"],
        block_m=_positive_int(data["block_m"], f"{source}: block_m"),
        block_n=_positive_int(data["block_n"], f"{source}: block_n"),
        densities=tuple(_density(d, f"{source}: densities[{i}]") for i, d in enumerate(data["densities"])),
        shapes=shapes, text_first=_flag(data.get("text_first", False), f"{source}: text_first"),
    )


def _parse_yaml(text: str, source: str) -> ModelSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"{source}: not valid YAML: {exc}") from None
    return parse_model_spec(data, source)


def load_model(name_or_path: str) -> ModelSpec:
    """A preset by name (``"hunyuan"``) or a custom model from a ``.yaml``/``.yml`` file path.

    Raises ModelSpecError naming the known presets for an unknown name, or the offending key for a
    malformed spec."""
    if name_or_path in preset_names():
        return _parse_yaml((_presets_dir() / f"{name_or_path}.yaml").read_text(), f"preset {name_or_path}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ModelSpecError(f"model spec {path}: no such file")
        if not path.is_file():  # a folder, a FIFO (reading it would block), a device
            raise ModelSpecError(f"model spec {path}: not a regular file")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ModelSpecError(f"model spec {path}: cannot be read ({exc.strerror or exc})") from None
        except UnicodeDecodeError as exc:
            raise ModelSpecError(f"model spec {path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
        if "\0" in text:
            raise ModelSpecError(f"model spec {path}: not a YAML text file (it holds NUL bytes)")
        return _parse_yaml(text, f"model spec {path}")
    raise ModelSpecError(f"unknown model {name_or_path!r}; known presets: {', '.join(preset_names())} "
                         f"(or pass the path of a .yaml model spec)")
